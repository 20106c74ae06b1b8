#!/usr/bin/env bash
# The paper's fine-tuning setting on one node: ViT-B-32 (OpenAI weights), batch 128 per GPU,
# lr 1e-5, wd 0.2, 9 epochs, m²-Mix defaults. LOSS=clip runs the baseline with the same settings.
#
#   TRAIN=data/flickr30k_train.csv VAL=data/flickr30k_test.csv NPROC=8 bash examples/train_single_node.sh
#   LOSS=clip ... bash examples/train_single_node.sh
#   DRY_RUN=1 bash examples/train_single_node.sh      # print the command only
set -euo pipefail
TRAIN=${TRAIN:-data/flickr30k_train.csv}
VAL=${VAL:-data/flickr30k_test.csv}
NPROC=${NPROC:-8}
LOSS=${LOSS:-m2mix}
NAME=${NAME:-flickr30k-vitb32-${LOSS}}

${DRY_RUN:+echo} python -m torch.distributed.run --nproc_per_node "${NPROC}" \
  -m m2mix_openclip.train -- \
  --model ViT-B-32 --pretrained openai \
  --train-data "${TRAIN}" --val-data "${VAL}" --csv-img-key filepath --csv-caption-key title \
  --batch-size 128 --lr 1e-5 --wd 0.2 --epochs 9 --warmup 500 --precision amp --workers 8 \
  --local-loss --gather-with-grad --seed 0 --logs logs --name "${NAME}" \
  --loss "${LOSS}"
