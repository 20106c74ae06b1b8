#!/usr/bin/env bash
# The paper's classification setting with OpenCLIP's trainer: ImageNet (or any ImageFolder tree) to K-shot or
# full class-prompt pairs; fine-tuning ViT-B-32 (OpenAI weights) with the contrastive loss on those pairs
# (FLYP, Goyal et al. 2023), --loss clip and --loss m2mix, the shifted sets tracked zero-shot at every
# evaluation; then m2mix-wiseft: the weight-space interpolation curves of both (WiSE-FT, Wortsman et al. 2022).
#
#   IMAGENET=data/imagenet NPROC=8 bash examples/imagenet_wiseft.sh             # full ImageNet
#   SHOTS=16 SEED=0 IMAGENET=data/imagenet bash examples/imagenet_wiseft.sh     # 16-shot
#   DRY_RUN=1 bash examples/imagenet_wiseft.sh                                  # print the commands only
#
# Every set is an ImageFolder tree (a folder per class); how its folders map to ImageNet's 1000 classes:
#   IMAGENET/train, IMAGENET/val  folders named by wnid (n01440764, ...; the validation images sorted into
#                                 them): by OUT/pairs/class_folders.tsv, which m2mix-data writes
#   IMAGENET_V2      imagenetv2-matched-frequency-format-val: folders 0 .. 999, the class index
#   IMAGENET_R       imagenet-r: 200 wnid folders; scored over those 200 classes
#   IMAGENET_SKETCH  sketch: 1000 wnid folders
#   IMAGENET_A       imagenet-a: 200 wnid folders; scored over those 200 classes
#   OBJECTNET        objectnet-1.0: images/ (313 folders) and mappings/; its 113 folders that overlap ImageNet
#                    are scored over those 113 classes, each logit the best of its ImageNet classes' logits
#                    (examples/objectnet_class_folders.py writes the map); the other 200 folders are left out
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
IMAGENET=${IMAGENET:-data/imagenet}
IMAGENET_V2=${IMAGENET_V2:-data/imagenetv2-matched-frequency-format-val}
IMAGENET_R=${IMAGENET_R:-data/imagenet-r}
IMAGENET_SKETCH=${IMAGENET_SKETCH:-data/sketch}
IMAGENET_A=${IMAGENET_A:-data/imagenet-a}
OBJECTNET=${OBJECTNET:-data/objectnet-1.0}
OUT=${OUT:-runs/imagenet${SHOTS:+-${SHOTS}shot}}
MODEL=${MODEL:-ViT-B-32}
PRETRAINED=${PRETRAINED:-openai}
SHOTS=${SHOTS:-}            # empty: every training image
SEED=${SEED:-0}             # the K-shot draw and the template of each image
ALL_TEMPLATES=${ALL_TEMPLATES:-}  # 1: every template as its own row (FLYP's ImageNet CSV; 80x the rows)
NPROC=${NPROC:-8}
BATCH=${BATCH:-64}          # per GPU: 512 over 8 GPUs, as FLYP
LR=${LR:-1e-5}
WD=${WD:-0.1}
EPOCHS=${EPOCHS:-10}
WARMUP=${WARMUP:-500}
WORKERS=${WORKERS:-8}
# DRY_RUN=1: print each command, quoted as the shell reads it
run() { if [ -n "${DRY_RUN:-}" ]; then printf '%q ' "$@"; echo; else "$@"; fi; }

# 1. ImageNet's class names and OpenAI's 80 prompt templates, as OpenCLIP ships them ({c}: the class name)
run mkdir -p "${OUT}"
run python -c "import sys; from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES
open(sys.argv[1], 'w').write(''.join(name + '\n' for name in IMAGENET_CLASSNAMES))
open(sys.argv[2], 'w').write(''.join(template('{c}') + '\n' for template in OPENAI_IMAGENET_TEMPLATES))" \
  "${OUT}/classnames.txt" "${OUT}/templates.txt"

# 2. training pairs: the i-th name for the i-th wnid folder in sorted order; K-shot with SHOTS
run m2mix-data --from "${IMAGENET}/train" --classnames "${OUT}/classnames.txt" --templates "${OUT}/templates.txt" \
  ${SHOTS:+--shots "${SHOTS}"} --seed "${SEED}" ${ALL_TEMPLATES:+--all-templates} --workers "${WORKERS}" \
  --out "${OUT}/pairs"

# 3. the class-folder map of every tree: ImageNet's wnids, and ObjectNet's folders
run python "${HERE}/objectnet_class_folders.py" --mappings "${OBJECTNET}/mappings" \
  --class-folders "${OUT}/pairs/class_folders.tsv" --out "${OUT}/class_folders.tsv"

SHIFTS=(imagenet_v2="${IMAGENET_V2}" imagenet_r="${IMAGENET_R}" imagenet_sketch="${IMAGENET_SKETCH}"
        imagenet_a="${IMAGENET_A}" objectnet="${OBJECTNET}/images")
TRACKED=()
for set in "${SHIFTS[@]}"; do TRACKED+=(--zeroshot-data "${set}"); done

# 4. fine-tune with each loss; OpenCLIP's own ImageNet zero-shot (--imagenet-val) and the shifted sets at every
#    evaluation (imagenet_v2-zeroshot-top1, ... in the logs)
for LOSS in clip m2mix; do
  run python -m torch.distributed.run --nproc_per_node "${NPROC}" -m m2mix_openclip.train -- \
    --model "${MODEL}" --pretrained "${PRETRAINED}" \
    --train-data "${OUT}/pairs/train.csv" --csv-img-key filepath --csv-caption-key title \
    --imagenet-val "${IMAGENET}/val" "${TRACKED[@]}" --zeroshot-classnames "${OUT}/classnames.txt" \
    --zeroshot-templates "${OUT}/templates.txt" --zeroshot-class-folders "${OUT}/class_folders.tsv" \
    --batch-size "${BATCH}" --lr "${LR}" --wd "${WD}" --epochs "${EPOCHS}" --warmup "${WARMUP}" \
    --precision amp --workers "${WORKERS}" --local-loss --gather-with-grad --seed 0 \
    --logs "${OUT}/logs" --name "${LOSS}" --loss "${LOSS}"
done

# 5. WiSE-FT: alpha 0, 0.1, ..., 1 between the zero-shot model and each fine-tuned one
OODS=()
for set in "${SHIFTS[@]}"; do OODS+=(--ood "${set}"); done
run m2mix-wiseft --model "${MODEL}" --pretrained "${PRETRAINED}" \
  --finetuned "${OUT}/logs/clip/checkpoints/epoch_${EPOCHS}.pt" "${OUT}/logs/m2mix/checkpoints/epoch_${EPOCHS}.pt" \
  --labels clip m2mix --id imagenet="${IMAGENET}/val" "${OODS[@]}" \
  --classnames "${OUT}/classnames.txt" --templates "${OUT}/templates.txt" --class-folders "${OUT}/class_folders.tsv" \
  --workers "${WORKERS}" --out "${OUT}/wiseft"
