"""``vpr-localizer export`` (ONNX + sidecar, fp32 and int8) and the ONNX Runtime encoder, on real lund_gps images.

Maps built through ``vpr-localizer build-map`` on the 8 even frames 02..16 (VGG16 at 160x120):
NetVLAD K=16 with PCA whitening (``--pca-min-images 4`` -> 7-D, so the folded PCA is checked),
GeM without PCA (512-D), and a guided one (``--attention``, refused). The 8 odd frames 01..15
are the queries.

Measured here (CPU, onnxruntime 1.32, torch 2.13): ONNX Runtime fp32 vs torch max abs difference
5.6e-6 (NetVLAD + PCA); checked against :data:`TOLERANCE`. Top-1 retrieval identical for 8/8
queries in fp32 and, with the backbone quantised to int8 (4 calibration images), 8/8 as well
(:data:`INT8_MIN_AGREE`).
"""
from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from vpr_localizer.cli.main import main
from vpr_localizer.errors import ConfigError, FingerprintMismatchError, WeightsError
from vpr_localizer.io.image_files import load_image
from vpr_localizer.localization.localize import encoder_for_map
from vpr_localizer.mapping.store import VprMap
from vpr_localizer.models.onnx_export import GUIDED_NOT_SUPPORTED, ExportGraph, sidecar_path
from vpr_localizer.models.onnx_runtime import OnnxEncoder, choose_providers

MAP_FRAMES = tuple(range(2, 17, 2))
QUERY_FRAMES = tuple(range(1, 16, 2))
SIZE = (160, 120)
#: max |onnxruntime fp32 - torch| accepted per descriptor component (measured 5.6e-6)
TOLERANCE = 1e-4
#: queries (of 8) whose int8 top-1 keyframe equals torch's (measured 8)
INT8_MIN_AGREE = 8


@pytest.fixture(scope="module", autouse=True)
def _one_faiss_thread(faiss_single_thread):
    """One faiss thread (see conftest.faiss_single_thread)."""


def quiet_main(argv):
    """``main(argv)`` with stdout/stderr captured: ``(rc, out, err)``."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def lund(tmp_path_factory, datasets_dir, data_file):
    root = tmp_path_factory.mktemp("lund_onnx")
    out = SimpleNamespace(map_dir=root / "map_images", query_dir=root / "query_images", root=root)
    for folder, frames in ((out.map_dir, MAP_FRAMES), (out.query_dir, QUERY_FRAMES)):
        folder.mkdir()
        for i in frames:
            shutil.copyfile(data_file(datasets_dir / "lund_gps" / f"{i:02d}.jpg"), folder / f"{i:02d}.jpg")
    out.query_paths = sorted(str(p) for p in out.query_dir.glob("*.jpg"))
    out.queries = [load_image(p) for p in out.query_paths]
    return out


def build(lund, vgg_path, name, *extra):
    out = lund.root / name
    rc, _, err = quiet_main(["build-map", "--images", lund.map_dir, "--gps", "exif", "--out", out,
                             "--weights", vgg_path, "--image-size", *SIZE, "--clusters", 16, "--device", "cpu",
                             *extra])
    assert rc == 0, err
    return out


@pytest.fixture(scope="module")
def netvlad(lund, vgg_path):
    """NetVLAD + PCA map, its torch encoder and its fp32 export."""
    path = build(lund, vgg_path, "map_netvlad", "--pca-min-images", 4)
    onnx = lund.root / "export" / "netvlad.onnx"
    rc, out, err = quiet_main(["export", "--map", path, "--out", onnx])
    assert rc == 0, err
    vmap = VprMap.load(str(path))
    enc = encoder_for_map(vmap, device="cpu")
    return SimpleNamespace(path=path, vmap=vmap, encoder=enc, onnx=onnx, stdout=out,
                           ref=enc.encode_images(lund.queries))  # torch descriptors of the queries


@pytest.fixture(scope="module")
def gem(lund, vgg_path):
    path = build(lund, vgg_path, "map_gem", "--aggregator", "gem")
    onnx = lund.root / "export" / "gem.onnx"
    rc, _, err = quiet_main(["export", "--map", path, "--out", onnx])
    assert rc == 0, err
    vmap = VprMap.load(str(path))
    return SimpleNamespace(path=path, vmap=vmap, encoder=encoder_for_map(vmap, device="cpu"), onnx=onnx)


def top1(queries: np.ndarray, vmap: VprMap) -> np.ndarray:
    """Best keyframe of each query by exact inner product against the map's stored descriptors."""
    db = vmap.index.reconstruct_n(0, vmap.index.ntotal)
    return np.argmax(queries @ db.T, axis=1)


def test_export_writes_onnx_and_sidecar(netvlad):
    import onnx

    side = json.loads(Path(sidecar_path(str(netvlad.onnx))).read_text())
    assert side["fingerprint"] == netvlad.vmap.fingerprint
    assert side["image_size"] == list(SIZE) and side["input"]["shape"] == [None, 3, SIZE[1], SIZE[0]]
    assert side["preprocessing"] == {"name": "caffe_bgr", "bgr": True, "scale": 1.0,
                                     "mean": [103.939, 116.779, 123.68], "std": [1.0, 1.0, 1.0]}
    assert side["output"]["dim"] == netvlad.encoder.dim == 7 and side["output"]["pca"] is True
    assert side["precision"] == "fp32" and side["opset"] == 17 and side["torch"]
    model = onnx.load(str(netvlad.onnx))
    in_dims = model.graph.input[0].type.tensor_type.shape.dim
    assert in_dims[0].dim_param == "batch" and [d.dim_value for d in in_dims[1:]] == [3, SIZE[1], SIZE[0]]
    assert "MatMul" in {n.op_type for n in model.graph.node}  # PCA folded into the graph
    assert "fp32" in netvlad.stdout and "(B, 7)" in netvlad.stdout


def test_onnxruntime_matches_torch_on_real_images(netvlad, lund):
    ort_enc = OnnxEncoder(str(netvlad.onnx), device="cpu", batch_size=3)  # batches of 3, 3, 2: dynamic axis
    ort_enc.check_map(netvlad.vmap)
    assert ort_enc.providers == ["CPUExecutionProvider"] and ort_enc.dim == 7
    ref = netvlad.ref
    got = ort_enc.encode_images(lund.queries)
    assert got.shape == ref.shape == (8, 7) and got.dtype == np.float32
    assert np.abs(got - ref).max() <= TOLERANCE
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # files go through the same decode + resize as the torch encoder
    res = ort_enc.encode_paths(lund.query_paths)
    assert res.ok == list(range(8)) and np.abs(res.descriptors - ref).max() <= TOLERANCE
    # the graph alone, fed with the torch preprocessing, equals the torch network
    x = netvlad.encoder.backbone.preprocessing(np.stack([lund.queries[0][:SIZE[1], :SIZE[0]]]), "cpu").numpy()
    import torch

    with torch.no_grad():
        t = ExportGraph(netvlad.encoder)(torch.from_numpy(x)).numpy()
    assert np.abs(ort_enc.run_preprocessed(x) - t).max() <= TOLERANCE
    assert (top1(got, netvlad.vmap) == top1(ref, netvlad.vmap)).all()


def test_gem_map_without_pca(gem, lund):
    ort_enc = OnnxEncoder(str(gem.onnx), device="cpu")
    ort_enc.check_map(gem.vmap)
    ref = gem.encoder.encode_images(lund.queries)
    got = ort_enc.encode_images(lund.queries)
    assert got.shape == (8, 512) and np.abs(got - ref).max() <= TOLERANCE
    assert (top1(got, gem.vmap) == top1(ref, gem.vmap)).all()


def test_int8_export_agrees_with_torch_top1(netvlad, lund):
    out = lund.root / "export" / "netvlad_int8.onnx"
    rc, stdout, err = quiet_main(["export", "--map", netvlad.path, "--out", out, "--int8",
                                  "--calibration-images", 4])
    assert rc == 0, err
    assert "int8 (calibrated on 4 images)" in stdout
    side = json.loads(Path(sidecar_path(str(out))).read_text())
    assert side["precision"] == "int8" and side["quantization"]["calibration_images"] == 4
    assert side["quantization"]["format"] == "QDQ" and side["quantization"]["per_channel"] is True
    assert out.stat().st_size < netvlad.onnx.stat().st_size / 3  # int8 weights
    ort_enc = OnnxEncoder(str(out), device="cpu")
    ort_enc.check_map(netvlad.vmap)
    ref = netvlad.ref
    got = ort_enc.encode_images(lund.queries)
    agree = int((top1(got, netvlad.vmap) == top1(ref, netvlad.vmap)).sum())
    print(f"int8 top-1 agreement {agree}/8, max abs diff {np.abs(got - ref).max():.3g}")
    assert agree >= INT8_MIN_AGREE


def test_localize_cli_onnxruntime_same_best_ids(netvlad, lund, tmp_path):
    out = tmp_path / "onnxruntime.json"
    rc, stdout, err = quiet_main(["localize", "--map", netvlad.path, "--images", lund.query_dir, "--out", out,
                                  "--device", "cpu", "--runtime", "onnxruntime", "--onnx", netvlad.onnx])
    assert rc == 0, err
    assert "localised 8 of 8 images" in stdout
    results = json.loads(out.read_text())["results"]
    assert [r["query"] for r in results] == [Path(p).name for p in lund.query_paths]
    # the torch encoder's top-1 keyframes (the localizer's best match is the top-1 retrieval)
    assert [r["best_id"] for r in results] == top1(netvlad.ref, netvlad.vmap).tolist()


def test_fingerprint_mismatch_is_refused(netvlad, gem, lund, tmp_path):
    # another map's export
    with pytest.raises(FingerprintMismatchError, match="aggregator"):
        OnnxEncoder(str(gem.onnx), device="cpu").check_map(netvlad.vmap)
    # an edited sidecar
    onnx = tmp_path / "edited.onnx"
    shutil.copyfile(netvlad.onnx, onnx)
    side = json.loads(Path(sidecar_path(str(netvlad.onnx))).read_text())
    side["fingerprint"]["params_sha256"] = "0" * 64
    Path(sidecar_path(str(onnx))).write_text(json.dumps(side))
    enc = OnnxEncoder(str(onnx), device="cpu")
    with pytest.raises(FingerprintMismatchError, match="params_sha256"):
        enc.check_map(netvlad.vmap)
    with pytest.raises(FingerprintMismatchError, match="params_sha256"):
        enc.check_fingerprint(netvlad.vmap.fingerprint)
    rc, _, err = quiet_main(["localize", "--map", netvlad.path, "--images", lund.query_dir, "--out",
                             tmp_path / "r.json", "--runtime", "onnxruntime", "--onnx", onnx])
    assert rc == 2 and "different encoder" in err and "params_sha256" in err
    # a model replaced after export
    shutil.copyfile(gem.onnx, onnx)
    with pytest.raises(WeightsError, match="SHA-256"):
        OnnxEncoder(str(onnx), device="cpu")


def test_guided_map_is_refused(lund, vgg_path, tmp_path):
    path = build(lund, vgg_path, "map_attention", "--attention")
    rc, _, err = quiet_main(["export", "--map", path, "--out", tmp_path / "g.onnx"])
    assert rc == 2 and GUIDED_NOT_SUPPORTED in err
    assert not (tmp_path / "g.onnx").exists()
    with pytest.raises(ConfigError, match="plain encoders"):
        ExportGraph(encoder_for_map(VprMap.load(str(path)), device="cpu"))


def test_missing_files_give_clear_errors(netvlad, lund, tmp_path):
    missing = tmp_path / "nothing.onnx"
    with pytest.raises(WeightsError, match="ONNX model not found: .*nothing.onnx"):
        OnnxEncoder(str(missing))
    rc, _, err = quiet_main(["localize", "--map", netvlad.path, "--images", lund.query_dir, "--out",
                             tmp_path / "r.json", "--runtime", "onnxruntime", "--onnx", missing])
    assert rc == 2 and "ONNX model not found" in err
    rc, _, err = quiet_main(["localize", "--map", netvlad.path, "--images", lund.query_dir, "--out",
                             tmp_path / "r.json", "--runtime", "onnxruntime"])
    assert rc == 2 and "needs --onnx" in err
    lonely = tmp_path / "lonely.onnx"
    shutil.copyfile(netvlad.onnx, lonely)
    with pytest.raises(WeightsError, match="sidecar .*lonely.json is missing"):
        OnnxEncoder(str(lonely))
    rc, _, err = quiet_main(["export", "--map", netvlad.path, "--out", tmp_path / "x.pt"])
    assert rc == 2 and ".onnx" in err


def test_provider_order():
    avail = ["CPUExecutionProvider", "OpenVINOExecutionProvider", "CUDAExecutionProvider",
             "TensorrtExecutionProvider", "AzureExecutionProvider"]
    assert choose_providers("auto", avail) == ["TensorrtExecutionProvider", "CUDAExecutionProvider",
                                               "OpenVINOExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers("cpu", avail) == ["CPUExecutionProvider"]
    assert choose_providers("cuda", avail) == ["TensorrtExecutionProvider", "CUDAExecutionProvider",
                                               "CPUExecutionProvider"]
    assert choose_providers("auto", ["AzureExecutionProvider", "CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    with pytest.raises(ConfigError, match="no GPU provider"):
        choose_providers("cuda", ["CPUExecutionProvider"])
    with pytest.raises(ConfigError, match="not installed"):
        choose_providers("CUDAExecutionProvider", ["CPUExecutionProvider"])


def test_calibration_images_from_map_or_folder(netvlad, lund):
    from vpr_localizer.cli.export import calibration_paths

    from_map = calibration_paths(netvlad.vmap, 4)
    assert len(from_map) == 4 and set(from_map) <= {k.image_path for k in netvlad.vmap.keyframes}
    from_dir = calibration_paths(netvlad.vmap, 3, str(lund.query_dir))
    assert len(from_dir) == 3 and all(Path(p).parent == lund.query_dir for p in from_dir)
    gone = SimpleNamespace(path="moved_map", keyframes=[SimpleNamespace(image_path="/nonexistent/01.jpg")])
    with pytest.raises(ConfigError, match="--calibration-dir"):
        calibration_paths(gone, 4)
    with pytest.raises(ConfigError, match=">= 1"):
        calibration_paths(netvlad.vmap, 0)


def test_tensorrt_gets_fp16_option_only_when_asked():
    from vpr_localizer.models.onnx_runtime import choose_providers, provider_options

    avail = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    chosen = choose_providers("cuda", available=avail)
    assert chosen == avail
    assert provider_options(chosen, fp16=True) == [("TensorrtExecutionProvider", {"trt_fp16_enable": True}),
                                                   "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert provider_options(chosen, fp16=False) == avail
    assert provider_options(choose_providers("cpu", available=avail)) == ["CPUExecutionProvider"]
