"""Patch-NetVLAD (Hausler et al., CVPR 2021) in maps, the localizer and the CLI, on real lund_gps images.

One map with patch descriptors is built per module through ``vpr-localizer build-map --patches``
(6 even lund frames, VGG16 at 320x240 = a 20x15 cell grid, NetVLAD K=8, patch sizes 2/5/8,
64-D patch PCA) and one without (128x96); the odd frames between them are the queries.
Checked: the map round trip (files, hashes, the ``patches`` section, memory map, stored ==
recomputed patches), the clear errors (no patches, tampered or inconsistent patch files, another
patch configuration, a grid too small), and that re-ranking puts a correct (adjacent) keyframe
first as often as measured.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from vpr_localizer.cli.main import main
from vpr_localizer.errors import FingerprintMismatchError, MapError
from vpr_localizer.localization.localize import Localizer, encoder_for_map
from vpr_localizer.localization.rerank import PatchReranker, RerankConfig, query_patch_encoder
from vpr_localizer.mapping.patches import NO_PATCHES_MESSAGE, PATCH_FILES
from vpr_localizer.mapping.store import VprMap
from vpr_localizer.models.aggregation import NetVLAD
from vpr_localizer.models.patch_netvlad import PatchDescriptors, PatchNetVLAD

MAP_FRAMES = (2, 4, 6, 8, 10, 12)
QUERY_FRAMES = (3, 5, 7, 9, 11)
SIZE = (320, 240)
GRID_HW = (15, 20)  # VGG16 conv5_3: 16 px per cell
COUNTS = [14 * 19, 11 * 16, 8 * 13]  # sizes 2, 5, 8 at stride 1 on 15x20 cells
DIM = 64


@pytest.fixture(scope="module", autouse=True)
def _one_faiss_thread(faiss_single_thread):
    """Every test of this module runs with one faiss thread (see conftest.faiss_single_thread)."""


@pytest.fixture(scope="module")
def lund(tmp_path_factory, datasets_dir, data_file):
    """Copies of the map (even) and query (odd) frames in two folders."""
    root = tmp_path_factory.mktemp("lund_patch")
    out = SimpleNamespace(map_dir=root / "map_images", query_dir=root / "query_images")
    for folder, frames in ((out.map_dir, MAP_FRAMES), (out.query_dir, QUERY_FRAMES)):
        folder.mkdir()
        for i in frames:
            shutil.copyfile(data_file(datasets_dir / "lund_gps" / f"{i:02d}.jpg"), folder / f"{i:02d}.jpg")
    return out


def run(argv, capsys):
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def enc_args(vgg_path, size=SIZE):
    return ["--weights", vgg_path, "--image-size", *size, "--clusters", 8, "--device", "cpu", "--batch-size", 3]


@pytest.fixture(scope="module")
def patch_map(lund, vgg_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("maps") / "with_patches"
    argv = ["build-map", "--images", lund.map_dir, "--gps", "exif", "--out", out, *enc_args(vgg_path),
            "--patches", "--patch-dim", DIM, "--patch-pca-images", 6, "--patch-pca-samples", 512]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main([str(a) for a in argv])
    assert rc == 0
    return SimpleNamespace(path=out, stdout=buf.getvalue())


@pytest.fixture(scope="module")
def plain_map(lund, vgg_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("maps") / "without_patches"
    assert main([str(a) for a in ["build-map", "--images", lund.map_dir, "--gps", "exif", "--out", out,
                                  *enc_args(vgg_path, (128, 96))]]) == 0
    return out


@pytest.fixture(scope="module")
def loaded(patch_map):
    vmap = VprMap.load(str(patch_map.path))
    enc = encoder_for_map(vmap, device="cpu")
    return SimpleNamespace(map=vmap, encoder=enc, patch_encoder=query_patch_encoder(enc, vmap))


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------------
# the map round trip
# --------------------------------------------------------------------------------------------

def test_build_map_reports_patch_storage(patch_map):
    per_kf = sum(COUNTS) * DIM * 2
    assert f"{per_kf} bytes per keyframe" in patch_map.stdout
    assert "sizes [2, 5, 8] on a 20x15 cell grid, 64-D float16" in patch_map.stdout


def test_map_yaml_lists_patch_files_and_section(patch_map):
    meta = yaml.safe_load((patch_map.path / "map.yaml").read_text())
    sec = meta["patches"]
    assert sec["patch_sizes"] == [2, 5, 8] and sec["strides"] == [1, 1, 1] and sec["dim"] == DIM
    assert sec["grid_hw"] == list(GRID_HW) and sec["counts"] == COUNTS and sec["dtype"] == "float16"
    assert sec["bytes_per_keyframe"] == sum(COUNTS) * DIM * 2
    assert sec["weights"] == "uniform" and sec["encoder_params_sha256"] == meta["encoder"]["params_sha256"]
    assert sec["pca"]["input_dim"] == 8 * 512 and sec["pca"]["dim"] == DIM and sec["pca"]["images"] == len(MAP_FRAMES)
    assert DIM < sec["pca"]["samples"] <= 512
    for name in PATCH_FILES:  # listed with size and SHA-256 like every other map file
        f = patch_map.path / name
        assert meta["files"][name] == {"bytes": f.stat().st_size, "sha256": sha256(f)}
    assert not [n for n in (patch_map.path.parent).iterdir() if ".tmp-" in n.name]


def test_loaded_patches_are_memory_mapped_float16(loaded):
    p = loaded.map.patches
    assert loaded.map.has_patches and len(p) == len(MAP_FRAMES)
    assert isinstance(p.descriptors, np.memmap) and p.descriptors.dtype == np.float16
    assert p.descriptors.shape == (len(MAP_FRAMES) * sum(COUNTS), DIM)
    np.testing.assert_array_equal(p.offsets, np.arange(len(MAP_FRAMES) + 1) * sum(COUNTS))
    kf = p.keyframe(3)
    assert [s.patch_size for s in kf] == [2, 5, 8] and [s.num_patches for s in kf] == COUNTS
    assert all(s.grid_hw == GRID_HW and s.descriptors.dtype == np.float16 for s in kf)
    np.testing.assert_allclose(np.linalg.norm(kf[1].descriptors.astype(np.float32), axis=1), 1.0, atol=2e-3)
    np.testing.assert_array_equal(kf[0].centres[:2], [[0.5, 0.5], [1.5, 0.5]])  # 2x2 patches, cells
    assert [s.patch_size for s in p.keyframe(0, [5])] == [5]


def test_stored_patches_equal_recomputed_ones(loaded, lund):
    """The map's patches come from the same feature map, NetVLAD and patch PCA as a query's."""
    img = str(lund.map_dir / f"{MAP_FRAMES[2]:02d}.jpg")
    got = []
    loaded.encoder.encode_paths([img], on_batch=lambda idx, e: got.extend(loaded.patch_encoder.extract(e.features)))
    stored = loaded.map.patches.keyframe(2)
    for q, s in zip(got[0], stored):
        assert q.descriptors.dtype == np.float32 and q.dim == DIM
        np.testing.assert_allclose(q.descriptors, s.descriptors.astype(np.float32), atol=2e-3)  # float16 storage


def test_gemm_window_sums_match_brute_force_netvlad():
    """``box_sum="gemm"`` (the map builder's) equals NetVLAD on every cropped window, with weights."""
    torch.manual_seed(0)
    nv = NetVLAD(8, 16).eval()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 16)).astype(np.float32)
    nv.init_from_clusters(x[:8] / np.linalg.norm(x[:8], axis=1, keepdims=True), x / np.linalg.norm(x, axis=1, keepdims=True))
    feats = torch.relu(torch.randn(2, 16, 7, 9))
    wts = torch.rand(2, 1, 7, 9)
    out = PatchNetVLAD(nv, (2, 5), (1, 2), box_sum="gemm").extract(feats, wts)
    for s, (p, st) in enumerate(((2, 1), (5, 2))):
        with torch.no_grad():
            ref = [nv(feats[:, :, y:y + p, x0:x0 + p], wts[:, :, y:y + p, x0:x0 + p]).numpy()
                   for y in range(0, 7 - p + 1, st) for x0 in range(0, 9 - p + 1, st)]
        ref = np.stack(ref, axis=1)
        for b in range(2):
            np.testing.assert_allclose(out[b][s].descriptors, ref[b], atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------
# clear errors
# --------------------------------------------------------------------------------------------

def test_map_without_patches_loads_but_cannot_rerank(plain_map, lund, tmp_path, capsys):
    vmap = VprMap.load(str(plain_map))
    assert not vmap.has_patches and "patches" not in vmap.meta
    assert not any((plain_map / n).exists() for n in PATCH_FILES)
    loc = Localizer(vmap)
    with pytest.raises(MapError, match="this map has no patch descriptors; rebuild it with --patches"):
        loc.rerank([], np.array([0]), np.array([1.0]), RerankConfig(mode="spatial"))
    with pytest.raises(MapError, match=NO_PATCHES_MESSAGE):
        PatchReranker(vmap, RerankConfig(mode="ransac"))
    rc, out, err = run(["localize", "--map", plain_map, "--images", lund.query_dir, "--rerank", "ransac",
                        "--out", tmp_path / "r.csv", "--device", "cpu"], capsys)
    assert rc == 2 and err.strip().endswith("this map has no patch descriptors; rebuild it with --patches")
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "r.csv").exists()


@pytest.fixture
def map_copy(patch_map, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(patch_map.path, dst)
    return dst


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", PATCH_FILES)
def test_tampered_patch_file_is_refused(map_copy, name):
    VprMap.load(str(map_copy))
    size = (map_copy / name).stat().st_size
    _flip_byte(map_copy / name)
    assert (map_copy / name).stat().st_size == size
    with pytest.raises(MapError, match=rf"{name.replace('.', '[.]')} does not match its SHA-256") as ei:
        VprMap.load(str(map_copy))
    assert not isinstance(ei.value, FingerprintMismatchError)


def test_truncated_patch_file_is_refused(map_copy):
    p = map_copy / "patches.npy"
    p.write_bytes(p.read_bytes()[:-DIM * 2])
    with pytest.raises(MapError, match=r"truncated or corrupt: patches\.npy has \d+ bytes"):
        VprMap.load(str(map_copy))


def _edit_section(d: Path, **changes):
    meta = yaml.safe_load((d / "map.yaml").read_text())
    for k, v in changes.items():
        if v is None:
            del meta["patches"][k]
        elif k == "files":
            del meta["files"][v]
        else:
            meta["patches"][k] = v
    (d / "map.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))


@pytest.mark.parametrize("changes,expected", [
    ({"counts": [1, 2, 3]}, r"counts \[1, 2, 3\] do not match the patch grid"),
    ({"dim": 32}, r"patches\.npy is float16 \(\d+, 64\), expected float16 \(\d+, 32\)"),
    ({"patch_sizes": [2, 5, 9]}, r"counts .* do not match the patch grid"),
    ({"encoder_params_sha256": "0" * 64}, r"made by another encoder"),
    ({"grid_hw": [2, 2]}, r"corrupt 'patches' section"),
    ({"files": "patch_pca.npz"}, r"lists no patch_pca\.npz"),
], ids=["counts", "dim", "sizes", "encoder", "grid", "unlisted-file"])
def test_inconsistent_patches_section_is_refused(map_copy, changes, expected):
    _edit_section(map_copy, **changes)
    with pytest.raises(MapError, match=expected):
        VprMap.load(str(map_copy))


def test_other_patch_configuration_is_refused(loaded, lund, tmp_path, capsys):
    vmap = loaded.map
    vmap.check_patch_config({"patch_sizes": [2, 5, 8], "strides": [1, 1, 1], "dim": DIM, "grid_hw": list(GRID_HW)})
    with pytest.raises(FingerprintMismatchError, match=r"patch_sizes: map \[2, 5, 8\] vs running \[5\]"):
        vmap.check_patch_config({"patch_sizes": [5]})
    with pytest.raises(FingerprintMismatchError, match=r"dim: map 64 vs running 512"):
        PatchReranker(vmap, RerankConfig(mode="spatial"), expected={"dim": 512})
    with pytest.raises(FingerprintMismatchError, match=r"grid_hw: map \[15, 20\] vs running \[30, 40\]"):
        vmap.check_patch_config({"grid_hw": [30, 40]})
    with pytest.raises(FingerprintMismatchError, match=r"requested for re-ranking but the map stores"):
        PatchReranker(vmap, RerankConfig(mode="spatial", patch_sizes=(4,)))
    # query patches of another grid (e.g. another input size) are refused, not silently matched
    rr = PatchReranker(vmap, RerankConfig(mode="spatial"))
    bad = [PatchDescriptors(5, np.zeros((4, DIM), np.float32), np.zeros((4, 2), np.float32), 1, (5, 8))]
    with pytest.raises(FingerprintMismatchError, match=r"grid_hw: map \[15, 20\] vs query \[5, 8\]"):
        rr.rerank(bad, np.array([0, 1]), np.array([0.9, 0.8]))
    rc, out, err = run(["localize", "--map", loaded.map.path, "--images", lund.query_dir, "--rerank", "spatial",
                        "--patch-sizes", 5, "--out", tmp_path / "r.csv", "--device", "cpu"], capsys)
    assert rc == 2 and "patch_sizes: map [2, 5, 8] vs running [5]" in err and len(err.strip().splitlines()) == 1


def test_grid_too_small_for_patches_is_a_clear_error(lund, vgg_path, tmp_path, capsys):
    rc, out, err = run(["build-map", "--images", lund.map_dir, "--gps", "exif", "--out", tmp_path / "m",
                        *enc_args(vgg_path, (128, 64)), "--patches"], capsys)
    assert rc == 2 and not (tmp_path / "m").exists()
    assert "Patch-NetVLAD at input 128x64 px: feature grid h=4 x w=8 cells is too small for patch size(s) [5, 8]" in err
    assert "512x256 px gives 32x16" in err
    rc, out, err = run(["build-map", "--images", lund.map_dir, "--out", tmp_path / "m", "--patch-dim", 32,
                        *enc_args(vgg_path)], capsys)
    assert rc == 2 and "--patch-dim only apply with --patches" in err


# --------------------------------------------------------------------------------------------
# re-ranking on real images
# --------------------------------------------------------------------------------------------

#: Measured on this map (VGG16 320x240, K=8, 64-D patches): queries whose first candidate is one
#: of the two adjacent even frames (5-15 m away), of 5. Best ids: single frame [4, 4, 8, 10, 10],
#: ransac [4, 4, 8, 10, 10], spatial [2, 4, 8, 10, 12] (it re-orders 2 of 5, both still adjacent).
MEASURED_ADJACENT_FIRST = {"none": 5, "ransac": 5, "spatial": 5}


@pytest.mark.parametrize("mode", ["none", "ransac", "spatial"])
def test_localize_rerank_puts_an_adjacent_keyframe_first(loaded, lund, tmp_path, capsys, mode):
    out = tmp_path / "poses.json"
    rc, stdout, err = run(["localize", "--map", loaded.map.path, "--images", lund.query_dir, "--rerank", mode,
                           "--rerank-k", 100, "--out", out, "--device", "cpu"], capsys)
    assert rc == 0, err
    if mode != "none":
        assert f"Patch-NetVLAD re-ranking ({mode}, top 100" in stdout
    rows = json.loads(out.read_text())["results"]
    assert [r["query"] for r in rows] == [f"{i:02d}.jpg" for i in QUERY_FRAMES]
    frames = [k.frame for k in loaded.map.keyframes]
    adjacent = sum(abs(frames[r["best_id"]] - q) == 1 for r, q in zip(rows, QUERY_FRAMES))
    assert adjacent >= MEASURED_ADJACENT_FIRST[mode] - 1  # margin: one query
    for r in rows:  # the pose estimate gets global cosines, in the re-ranked order
        assert all(-1.0 <= s <= 1.0 + 1e-5 for s in r["top_scores"]) and r["top_ids"][0] == r["best_id"]
        assert sorted(r["top_ids"]) == list(range(len(MAP_FRAMES)))


def test_localizer_rerank_keeps_global_cosines(loaded, lund):
    qp, desc = [], []

    def hook(idx, e):
        qp.extend(loaded.patch_encoder.extract(e.features))
        desc.append(e.descriptors)
    loaded.encoder.encode_paths([str(lund.query_dir / f"{i:02d}.jpg") for i in QUERY_FRAMES], on_batch=hook)
    desc = np.concatenate(desc)
    loc = Localizer(loaded.map)
    scores, ids = loc.retrieve(desc, 6)
    for mode in ("ransac", "spatial"):
        cfg = RerankConfig(mode=mode, k=4)
        for q in range(len(QUERY_FRAMES)):
            r = loc.rerank(qp[q], ids[q], scores[q], cfg)
            assert sorted(r.ids.tolist()) == sorted(ids[q, :4].tolist())  # only the top k are re-ranked
            cos = dict(zip(ids[q].tolist(), scores[q].tolist()))
            np.testing.assert_allclose(r.scores, [cos[i] for i in r.ids.tolist()], rtol=0, atol=0)
            assert np.all(np.diff(r.patch_scores) <= 1e-12) and r.seconds > 0
        ests = loc.localize_reranked(desc, qp, cfg)
        assert [e.best_id for e in ests] == [int(loc.rerank(qp[q], ids[q], scores[q], cfg).ids[0])
                                            for q in range(len(QUERY_FRAMES))]


def test_evaluate_adds_patch_netvlad_rows(lund, vgg_path, tmp_path):
    """``evaluate`` scores single-frame and both re-ranking modes in one run, with timings and storage."""
    from vpr_localizer.evaluation.evaluate import GroundTruth, evaluate
    from vpr_localizer.io.records import records_from_folder
    from vpr_localizer.models.config import EncoderConfig
    from vpr_localizer.models.patch_encoder import PatchSettings

    mrec = records_from_folder(str(lund.map_dir), gps="exif")[:4]
    qrec = records_from_folder(str(lund.query_dir), gps="exif")[:2]
    cfg = EncoderConfig(backbone="vgg16", weights=str(vgg_path), image_size=(256, 192), num_clusters=8,
                        device="cpu", batch_size=4)
    res = evaluate(mrec, qrec, cfg, GroundTruth("position", thresholds_m=(25.0, 3.0)), str(tmp_path / "ev"),
                   progress=False, save_map_dir=False, max_n=4,
                   rerank=[RerankConfig(mode="spatial", k=3), RerankConfig(mode="ransac", k=3)],
                   patch_settings=PatchSettings(dim=16, pca_images=4, pca_samples=128))
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert {"NetVLAD", "NetVLAD + Patch-NetVLAD (speed)", "NetVLAD + Patch-NetVLAD (performance)"} <= set(m["methods"])
    speed, perf = m["methods"]["NetVLAD + Patch-NetVLAD (speed)"], m["methods"]["NetVLAD + Patch-NetVLAD (performance)"]
    assert speed["rerank"]["patch_sizes_scored"] == [5] and perf["rerank"]["patch_sizes_scored"] == [2, 5, 8]
    assert speed["rerank"]["k_effective"] == 3 and perf["rerank"]["ms_per_query"] > 0
    assert m["patches"]["grid_hw"] == [12, 16] and m["patches"]["bytes_per_keyframe"] == (11 * 15 + 8 * 12 + 5 * 9) * 16 * 2
    assert perf["recall"]["25m"]["at"]["1"]["total"] == 2 and len(perf["localization"]["errors_m"]) == 2
    assert res.metrics["queries"]["step"] == 1
