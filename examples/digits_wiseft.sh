#!/usr/bin/env bash
# Robust classification fine-tuning on the bundled digits, on a laptop (a few minutes on 2 CPU cores):
# labelled images -> 16-shot class-prompt pairs -> fine-tune a small CLIP with --loss clip and with
# --loss m2mix through OpenCLIP's trainer (FLYP-style) -> WiSE-FT curves on the clean test split and its
# rotated, blurred and noisy copies. The zero-shot model is the tiny CLIP that m2mix-demo pre-trains.
# A learning rate of 1e-3 on 16 images a class over-fits on purpose: the fine-tuned end loses accuracy,
# and the interpolation shows what WiSE-FT recovers. --m2mix-weight 0.1 as in m2mix-demo.
#
#   bash examples/digits_wiseft.sh                 # OUT=digits-wiseft by default
#   DRY_RUN=1 bash examples/digits_wiseft.sh       # print the commands only
set -euo pipefail
OUT=${OUT:-digits-wiseft}
SHOTS=${SHOTS:-16}
EPOCHS=${EPOCHS:-10}
LR=${LR:-1e-3}
M2MIX_WEIGHT=${M2MIX_WEIGHT:-0.1}
TEMPLATES=${TEMPLATES:-"a handwritten digit {c};handwriting showing {c};number {c} in pen"}
# DRY_RUN=1: print each command, quoted as the shell reads it
run() { if [ -n "${DRY_RUN:-}" ]; then printf '%q ' "$@"; echo; else "$@"; fi; }

# the zero-shot model (demo-out/model, demo-out/pretrained.pt) and the digit scans with shifted test copies
[ -e "${OUT}/demo/pretrained.pt" ] || run m2mix-demo --out "${OUT}/demo"
[ -e "${OUT}/digits/classnames.txt" ] || run m2mix-data --out "${OUT}/digits"
D="${OUT}/digits"

run m2mix-data --from "${D}/finetune.csv" --classnames "${D}/classnames.txt" --templates "${TEMPLATES}" \
  --shots "${SHOTS}" --seed 0 --out "${OUT}/pairs"

for LOSS in clip m2mix; do
  EXTRA=(); [ "${LOSS}" = m2mix ] && EXTRA=(--m2mix-weight "${M2MIX_WEIGHT}")
  run m2mix-train --model "local-dir:${OUT}/demo/model" --resume "${OUT}/demo/pretrained.pt" \
    --train-data "${OUT}/pairs/train.csv" --csv-img-key filepath --csv-caption-key title \
    --val-data "${D}/test.csv" --zeroshot-data "clean=${D}/test.csv" --zeroshot-data "rotated=${D}/test-rotate.csv" \
    --zeroshot-classnames "${D}/classnames.txt" --zeroshot-templates "${TEMPLATES}" \
    --device cpu --precision fp32 --workers 0 --batch-size 32 --lr "${LR}" --wd 0.1 --epochs "${EPOCHS}" --warmup 5 \
    --seed 0 --report-to "" --logs "${OUT}/logs" --name "${LOSS}" --loss "${LOSS}" ${EXTRA[@]+"${EXTRA[@]}"}
done

run m2mix-wiseft --model "local-dir:${OUT}/demo/model" --checkpoint "${OUT}/demo/pretrained.pt" \
  --finetuned "${OUT}/logs/clip/checkpoints/epoch_${EPOCHS}.pt" "${OUT}/logs/m2mix/checkpoints/epoch_${EPOCHS}.pt" \
  --labels clip m2mix --id "clean=${D}/test.csv" --ood "rotated=${D}/test-rotate.csv" \
  --ood "blurred=${D}/test-blur.csv" --ood "noisy=${D}/test-noise.csv" \
  --classnames "${D}/classnames.txt" --templates "${TEMPLATES}" --device cpu --out "${OUT}/wiseft"
