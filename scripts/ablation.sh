#!/usr/bin/env bash
# The README's ablation table (issue 4, the shape of the seed's Table 3): one command per row,
# plus the training run that the trained rows load. Runs in the project venv (scripts/setup_env.sh).
#   bash scripts/ablation.sh            # all rows; outputs in results/ablation/
#   SHARED=/path/to/shared DEVICE=cuda bash scripts/ablation.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ] && [ -x .venv/bin/python ]; then source .venv/bin/activate; fi
SHARED=${SHARED:-../shared}
OUT=${OUT:-results/ablation}
DEVICE=${DEVICE:-auto}
SC=gardens_day_vs_night,gardens_night_vs_day,trail_dry_vs_snow,nordland_heldout_winter_vs_summer,lund_odd_vs_even
run() { local name=$1; shift; echo "== row $name: vpr-localizer demo --no-ros --scenarios ... $*"
        vpr-localizer demo --no-ros --no-map --shared "$SHARED" --device "$DEVICE" --scenarios "$SC" \
            --out "$OUT/$name" "$@" | tee "$OUT/$name.log"; }
mkdir -p "$OUT"
run netvlad
run static_mask --static-mask
run seg_stream --static-mask --seg-stream
vpr-localizer train --shared "$SHARED" --device "$DEVICE" --out "$OUT/train/seg_att.pt" --epochs 4 \
    --static-mask --seg-stream --attention | tee "$OUT/train_seg_att.log"
run seg_att_trained --static-mask --seg-stream --attention --checkpoint "$OUT/train/seg_att.pt"
python -m vpr_localizer.evaluation.report \
    "NetVLAD (ImageNet + k-means, untrained)=$OUT/netvlad/summary.json" \
    "+ static mask=$OUT/static_mask/summary.json" \
    "+ segmentation stream=$OUT/seg_stream/summary.json" \
    "+ segmentation + attention (trained)=$OUT/seg_att_trained/summary.json" \
    | tee "$OUT/ablation.md"
