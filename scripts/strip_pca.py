"""Write a copy of an encoder checkpoint without its PCA whitening (the maps built with it then
fit their own, as an untrained encoder's do), or with ``--backbone-only`` only its fine-tuned
backbone tail (no aggregator, no PCA: each map fits NetVLAD by k-means).

    python scripts/strip_pca.py IN.pt OUT.pt [--backbone-only] [--weights ../shared/weights/vgg16_features_imagenet_caffe_bgr.pth]

Used for the shipped ``vgg16_conv5_nordland`` (README "Training"): the 224-D training-set PCA
that fits in the repository's 30 MB lowered held-out recall@1 (226 -> 188 of 976), and the
trained conv5 with a NetVLAD vocabulary fitted on each map beat the trained NetVLAD layer
(held-out 245 vs 226 of 976; Lund 5.8 vs 28.3 m mean error).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main() -> int:
    from vpr_localizer.models.checkpoint import load_checkpoint
    from vpr_localizer.models.config import EncoderConfig
    from vpr_localizer.models.encoder import Encoder
    from vpr_localizer.models.registry import default_backbone_weights

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--weights", help="backbone weight file (default: the conventional one)")
    ap.add_argument("--backbone-only", action="store_true", help="keep only the fine-tuned backbone tail")
    a = ap.parse_args()
    ckpt = load_checkpoint(a.src)
    if a.backbone_only:
        from vpr_localizer.models.checkpoint import save_checkpoint

        if ckpt["backbone"].get("tail") is None:
            raise SystemExit(f"{a.src}: no fine-tuned backbone tail to keep")
        ckpt.update(aggregator=None, pca=None, fingerprint=None)
        save_checkpoint(ckpt, a.dst)
        print(f"{a.dst}: {os.path.getsize(a.dst) / 2**20:.1f} MiB, backbone tail only")
        return 0
    bb, agg = ckpt["backbone"], ckpt["aggregator"]
    enc = Encoder(EncoderConfig(backbone=bb["name"], weights=a.weights or default_backbone_weights(bb["name"]),
                                preprocessing=bb["preprocessing"], image_size=tuple(bb["image_size"]),
                                aggregator=agg["type"], num_clusters=int(agg["num_clusters"]), checkpoint=a.src,
                                device="cpu"))
    enc.pca = None
    enc.save_checkpoint(a.dst)
    print(f"{a.dst}: {os.path.getsize(a.dst) / 2**20:.1f} MiB, fingerprint pca_dim {enc.fingerprint()['pca_dim']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
