"""int8 ONNX on the day/night scenarios: Gardens Point day->night and night->day, recall@1 of
VGG16 + NetVLAD (the scenario's map and input size) in torch, ONNX Runtime fp32 and int8
(calibrated on the map images), queries encoded by each against the same torch-built map.

    python benchmarks/bench_int8_gardens.py      # prints the counts, writes results/bench_int8_gardens.json
"""
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import numpy as np  # noqa: E402
from vpr_localizer.evaluation.scenarios import get_scenario  # noqa: E402
from vpr_localizer.models.config import EncoderConfig  # noqa: E402
from vpr_localizer.models.encoder import Encoder  # noqa: E402
from vpr_localizer.mapping.build import build_map  # noqa: E402
from vpr_localizer.mapping.store import VprMap  # noqa: E402
from vpr_localizer.localization.localize import encoder_for_map  # noqa: E402
from vpr_localizer.models.onnx_export import export_onnx  # noqa: E402
from vpr_localizer.models.onnx_runtime import OnnxEncoder  # noqa: E402
SHARED = REPO.parent / "shared"
ds = str(SHARED / "datasets")
out = {}
for name in ("gardens_day_vs_night", "gardens_night_vs_day"):
    sc = get_scenario(name)
    m, q = sc.map.load(ds), sc.queries.load(ds)
    tmp = tempfile.mkdtemp()
    cfg = EncoderConfig(weights=str(SHARED / "weights" / "vgg16_features_imagenet_caffe_bgr.pth"), image_size=sc.image_size, device="cpu")
    build_map(m, Encoder(cfg), f"{tmp}/map", progress=False)
    vmap = VprMap.load(f"{tmp}/map")
    enc = encoder_for_map(vmap, device="cpu")
    mplace = np.array([k.place_id for k in vmap.keyframes])
    qplace = np.array([r.place_id for r in q])
    M = vmap.index.reconstruct_n(0, vmap.index.ntotal)
    res = {}
    res["torch"] = enc.encode_paths([r.path for r in q]).descriptors
    for prec in ("fp32", "int8"):
        p = f"{tmp}/enc_{prec}.onnx"
        export_onnx(enc, p, fingerprint=vmap.fingerprint, int8=prec == "int8",
                    calibration_paths=[r.path for r in m])
        oe = OnnxEncoder(p, device="cpu")
        res[prec] = oe.encode_paths([r.path for r in q]).descriptors
    for k, d in res.items():
        top1 = mplace[np.argmax(d @ M.T, 1)]
        out[(name, k)] = int((top1 == qplace).sum())
        print(name, k, f"{out[(name, k)]}/{len(q)}", flush=True)

os.makedirs(REPO / "results", exist_ok=True)
with open(REPO / "results" / "bench_int8_gardens.json", "w") as f:
    json.dump({f"{n}/{k}": v for (n, k), v in out.items()}, f, indent=1)
