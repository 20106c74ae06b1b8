#!/usr/bin/env bash
# m³-Mix with the reference's values (changdaeoh/multimodal-mixup, scripts/m3mix.sh): m²-Mix plus
# V-Mix, L-Mix and VL-Mix on one caption per image, ViT-B-32 (OpenAI weights), batch 128, 9 epochs,
# 10% warmup. m²-Mix alpha 0.2 and weight 0.02 here = the reference's mmmix 0.01 (it sums the two
# directions, we average them); uni-modal alpha 0.5, V-Mix = L-Mix = 0.05, VL-Mix 0.05 (its sweep:
# 0.05-0.2), uni-modal temperature 0.01 and m²-Mix temperature 0.07 as the reference fixes them.
# Its other settings: LR=7e-6, WD=0.01.
#
#   python examples/prepare_captions.py ... --out data/flickr30k_train.csv --one-caption-out data/flickr30k_train_onecap.csv
#   TRAIN=data/flickr30k_train_onecap.csv VAL=data/flickr30k_test.csv bash examples/train_m3mix.sh
#   DRY_RUN=1 bash examples/train_m3mix.sh      # print the command only
set -euo pipefail
TRAIN=${TRAIN:-data/flickr30k_train_onecap.csv}
VAL=${VAL:-data/flickr30k_test.csv}
NPROC=${NPROC:-1}
BATCH=${BATCH:-128}
EPOCHS=${EPOCHS:-9}
LR=${LR:-1e-5}
WD=${WD:-0.2}
VLMIX=${VLMIX:-0.05}
NAME=${NAME:-m3mix-vitb32-lr${LR}-wd${WD}-vl${VLMIX}}
# 10% of all steps: training rows (the CSV's lines less its header, or NUM_SAMPLES) / global batch
if [[ -z "${NUM_SAMPLES:-}" ]]; then
  if [[ -f "${TRAIN}" ]]; then NUM_SAMPLES=$(( $(wc -l < "${TRAIN}") - 1 )); else NUM_SAMPLES=29000; fi
fi
STEPS=$(( (NUM_SAMPLES + BATCH * NPROC - 1) / (BATCH * NPROC) * EPOCHS ))
WARMUP=${WARMUP:-$(( STEPS / 10 > 0 ? STEPS / 10 : 1 ))}

${DRY_RUN:+echo} python -m torch.distributed.run --nproc_per_node "${NPROC}" \
  -m m2mix_openclip.train -- \
  --model ViT-B-32 --pretrained openai \
  --train-data "${TRAIN}" --val-data "${VAL}" --csv-img-key filepath --csv-caption-key title \
  --batch-size "${BATCH}" --lr "${LR}" --wd "${WD}" --epochs "${EPOCHS}" --warmup "${WARMUP}" \
  --precision amp --workers 8 --local-loss --gather-with-grad --seed 0 --logs logs --name "${NAME}" \
  --loss m2mix --m2mix-weight 0.02 --m2mix-alpha 0.2 --m2mix-temperature 0.07 \
  --vmix-weight 0.05 --lmix-weight 0.05 --vlmix-weight "${VLMIX}" --unimix-alpha 0.5 \
  --unimix-temperature 0.01
