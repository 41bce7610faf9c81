"""Copy a trained checkpoint (with its .json log and .png curves) into the package as a shipped
checkpoint and record the check the test suite repeats (test/test_trained_checkpoint.py).

    python scripts/ship_trained.py results/train_run2/vgg16_conv5_nordland.pt vgg16_conv5_nordland \
        --command "vpr-localizer train ..." [--shared ../shared]

The check: recall@1 (exact place) of the winter thumbnails against the summer thumbnails at a
fixed subset of the training set's *validation* places (positions 2140-2499, every 5th), encoded
by ``Encoder`` with the checkpoint at 128x64 (a backbone-only checkpoint first fits NetVLAD by
k-means on the subset's summer images, as a map would). Stored in the shipped .json as
``subset_check``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from vpr_localizer.trained import HERE  # noqa: E402

SUBSET = (2140, 2500, 5)


def subset_recall(checkpoint: str, shared: str):
    """(hits, queries, top-1 indices) of the subset check (module docstring)."""
    from vpr_localizer.evaluation.scenarios import ImageSetSpec
    from vpr_localizer.io.image_files import load_image
    from vpr_localizer.models.config import EncoderConfig
    from vpr_localizer.models.encoder import Encoder

    enc = Encoder(EncoderConfig(weights=os.path.join(shared, "weights", "vgg16_features_imagenet_caffe_bgr.pth"),
                                image_size=(128, 64), checkpoint=checkpoint, device="cpu", batch_size=16))
    sets = [ImageSetSpec(f"nordland_thumbs/{s}", gps="none", index_range=SUBSET[:2], index_step=SUBSET[2])
            .load(os.path.join(shared, "datasets")) for s in ("summer", "winter")]
    if not enc.trained:
        enc.fit_aggregator([r.path for r in sets[0]])
    summer, winter = ([load_image(r.path) for r in t] for t in sets)
    top1 = (enc.encode_images(winter) @ enc.encode_images(summer).T).argmax(axis=1)
    return int((top1 == np.arange(len(top1))).sum()), len(top1), top1.tolist()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("name")
    ap.add_argument("--command", required=True, help="the exact training command, recorded in the log")
    ap.add_argument("--shared", default=os.path.join(os.path.dirname(HERE), "..", "..", "shared"))
    a = ap.parse_args()
    stem = os.path.splitext(a.checkpoint)[0]
    dst = os.path.join(HERE, a.name)
    shutil.copyfile(a.checkpoint, dst + ".pt")
    shutil.copyfile(stem + ".png", dst + ".png")
    with open(stem + ".json") as fh:
        log = json.load(fh)
    hits, n, top1 = subset_recall(dst + ".pt", a.shared)
    log["command"] = a.command
    log["checkpoint"] = os.path.basename(dst + ".pt")
    log["subset_check"] = {"positions": list(SUBSET), "image_size": [128, 64], "hits": hits, "queries": n,
                           "top1": top1}
    with open(dst + ".json", "w") as fh:
        json.dump(log, fh, indent=2)
    print(f"shipped {dst}.pt ({os.path.getsize(dst + '.pt') / 2**20:.1f} MiB); subset check recall@1 {hits}/{n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
