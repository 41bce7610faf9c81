#!/usr/bin/env bash
# The README's ablation table (issue 4, the shape of the seed's Table 3), on top of the trained
# encoder (issue 8): every row uses the shipped Nordland-trained conv5 (vgg16_conv5_nordland, the
# default checkpoint). One command per row, plus the training run the last row loads: NetVLAD and
# both attention modules trained on the Nordland training part on top of that conv5 (frozen, so
# the two streams' features are cached once). Runs in the project venv (scripts/setup_env.sh).
#   bash scripts/ablation.sh                      # all rows; outputs in results/ablation/
#   ROWS="seg_stream seg_att_trained" bash scripts/ablation.sh   # only these rows (+ the report)
#   SHARED=/path/to/shared DEVICE=cuda bash scripts/ablation.sh
# The untrained table (ImageNet conv5): CHECKPOINT=none OUT=results/ablation_untrained with the
# old training row's flags (README "Ablation").
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ] && [ -x .venv/bin/python ]; then source .venv/bin/activate; fi
SHARED=${SHARED:-../shared}
OUT=${OUT:-results/ablation}
DEVICE=${DEVICE:-auto}
CHECKPOINT=${CHECKPOINT:-vgg16_conv5_nordland}
ROWS=${ROWS:-netvlad static_mask seg_stream seg_att_trained}
SC=gardens_day_vs_night,gardens_night_vs_day,trail_dry_vs_snow,nordland_heldout_winter_vs_summer,lund_odd_vs_even
want() { [[ " $ROWS " == *" $1 "* ]]; }
run() { local name=$1; shift; want "$name" || return 0
        echo "== row $name: vpr-localizer demo --no-ros --no-map --scenarios ... $*"
        vpr-localizer demo --no-ros --no-map --shared "$SHARED" --device "$DEVICE" --scenarios "$SC" \
            --out "$OUT/$name" "$@" | tee "$OUT/$name.log"; }
mkdir -p "$OUT"
run netvlad --checkpoint "$CHECKPOINT"
run static_mask --checkpoint "$CHECKPOINT" --static-mask
run seg_stream --checkpoint "$CHECKPOINT" --static-mask --seg-stream
if want seg_att_trained; then
    # conv5 stays the shipped one (--no-tail); NetVLAD (k-means start) and attention train;
    # no PCA in the checkpoint, so it runs at every scenario's input size (maps fit their own)
    vpr-localizer train --shared "$SHARED" --device "$DEVICE" --out "$OUT/train/seg_att.pt" \
        --checkpoint "$CHECKPOINT" --no-tail --static-mask --seg-stream --attention \
        --epochs "${EPOCHS:-6}" --queries-per-epoch "${QUERIES_PER_EPOCH:-3000}" --no-pca \
        --cache-dir "$OUT/train_cache" | tee "$OUT/train_seg_att.log"
fi
run seg_att_trained --static-mask --seg-stream --attention --checkpoint "$OUT/train/seg_att.pt"
python -m vpr_localizer.evaluation.report \
    "NetVLAD, trained conv5 (vgg16_conv5_nordland) + k-means=$OUT/netvlad/summary.json" \
    "+ static mask=$OUT/static_mask/summary.json" \
    "+ segmentation stream=$OUT/seg_stream/summary.json" \
    "+ segmentation + attention (NetVLAD and attention trained)=$OUT/seg_att_trained/summary.json" \
    | tee "$OUT/ablation.md"
