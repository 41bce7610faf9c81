#!/usr/bin/env bash
# End-to-end fine-tuning on a GPU (issue 8): VGG16 conv4_1..conv5_3 + NetVLAD on the Nordland
# training part (positions 0-2499, summer / winter / simulated night) at the scenario's 128x64
# input, then the held-out Nordland scenario with the result. The same `vpr-localizer train`
# command as the CPU run, with --device cuda --train-from conv4: pool3 features are cached once
# (float16, memory-mapped), conv4 + conv5 + NetVLAD train on them. Writes OUT/vgg16_conv4_nordland.pt
# with its .json log and .png curves (loss, validation recall@1/5 per epoch), OUT/heldout/
# (metrics, plots) and OUT/summary.txt. Sized for < 10 min on one data-centre GPU.
#   bash scripts/train_gpu.sh                   # DEVICE=cuda
#   DEVICE=cpu EPOCHS=1 QUERIES_PER_EPOCH=64 bash scripts/train_gpu.sh    # the same path on a CPU (slow)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ] && [ -x .venv/bin/python ]; then source .venv/bin/activate; fi
SHARED=${SHARED:-../shared}
OUT=${OUT:-results/train_gpu}
DEVICE=${DEVICE:-cuda}
EPOCHS=${EPOCHS:-16}
QUERIES_PER_EPOCH=${QUERIES_PER_EPOCH:-2000}
mkdir -p "$OUT"
start=$(date +%s)
vpr-localizer train --training-set nordland_train --shared "$SHARED" --device "$DEVICE" \
    --train-from conv4 --epochs "$EPOCHS" --queries-per-epoch "$QUERIES_PER_EPOCH" --negatives 5 \
    --queries-per-step 8 --lr 1e-4 --tail-lr 5e-6 --lr-gamma 0.9 --no-pca --seed 0 \
    --cache-dir "$OUT/cache" --out "$OUT/vgg16_conv4_nordland.pt" | tee "$OUT/train.log"
trained=$(date +%s)
vpr-localizer evaluate --scenario nordland_heldout_winter_vs_summer --shared "$SHARED" --device "$DEVICE" \
    --checkpoint "$OUT/vgg16_conv4_nordland.pt" --no-map --out "$OUT" --name heldout | tee "$OUT/heldout.log"
{
    echo "device: $DEVICE ($(python -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")'))"
    echo "train (cache + epochs): $((trained - start)) s; held-out evaluation: $(( $(date +%s) - trained )) s"
    grep -E "^epoch|^kept epoch" "$OUT/train.log" || true
    grep -E "R@1" "$OUT/heldout.log" || true
} | tee "$OUT/summary.txt"
