"""The map directory on disk (``vpr_localizer.mapping.store``) with a real map built from lund_gps.

One small map is built per module (6 even lund frames, VGG16 at 128x96, NetVLAD K=8) and then
loaded, compared with an independent reading of the EXIF GPS (Pillow, not piexif) converted
with pymap3d, corrupted in copies, and rewritten to test the atomic writer.
"""
from __future__ import annotations

import hashlib
import math
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pymap3d
import pytest
import torch
import yaml

from conftest import exif_gps_pillow
from vpr_localizer.mapping import store as map_store
from vpr_localizer.models.config import EncoderConfig
from vpr_localizer.models.encoder import Encoder
from vpr_localizer.errors import FingerprintMismatchError, MapError, WeightsError
from vpr_localizer.mapping.index import build_index
from vpr_localizer.localization.localize import encoder_for_map
from vpr_localizer.mapping.store import VprMap, write_map
from vpr_localizer.mapping.build import build_map
from vpr_localizer.io.records import records_from_folder, select

FRAMES = (2, 4, 6, 8, 10, 12)
SIZE = (128, 96)
K = 8
FINGERPRINT_KEYS = {"backbone", "weights_sha256", "preprocessing", "image_size", "aggregator",
                    "num_clusters", "local_dim", "raw_dim", "descriptor_dim", "pca_dim", "params_sha256"}


# --------------------------------------------------------------------------------------------
# helpers and fixtures
# --------------------------------------------------------------------------------------------

def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def dir_digest(path) -> dict:
    return {n: sha256(os.path.join(path, n)) for n in sorted(os.listdir(path))}


def leftovers(map_path) -> list:
    """Temporary / backup siblings the atomic writer may leave next to ``map_path``."""
    parent, base = os.path.split(os.path.abspath(map_path))
    return [n for n in os.listdir(parent) if n.startswith(f".{base}.") and (".tmp-" in n or ".old-" in n)]


@pytest.fixture(scope="module", autouse=True)
def _one_faiss_thread(faiss_single_thread):
    """Every test of this module runs with one faiss thread (see conftest.faiss_single_thread)."""


@pytest.fixture(scope="module")
def lund_dir(datasets_dir, data_file):
    d = datasets_dir / "lund_gps"
    for i in FRAMES:
        data_file(d / f"{i:02d}.jpg")
    return d


def small_config(vgg_path, **kw) -> EncoderConfig:
    d = dict(backbone="vgg16", weights=str(vgg_path), image_size=SIZE, num_clusters=K, device="cpu",
             batch_size=8)
    d.update(kw)
    return EncoderConfig(**d)


@pytest.fixture(scope="module")
def built(tmp_path_factory, vgg_path, lund_dir):
    """The real map: path, records, the encoder that built it and its descriptors."""
    records = [r for r in select(records_from_folder(str(lund_dir), gps="exif"), "even") if r.frame in FRAMES]
    assert [r.frame for r in records] == list(FRAMES)
    encoder = Encoder(small_config(vgg_path))
    out = tmp_path_factory.mktemp("map_store") / "lund_even"
    report = build_map(records, encoder, str(out), progress=False)
    descriptors = encoder.encode_paths([r.path for r in records]).descriptors
    return SimpleNamespace(path=str(out), records=records, encoder=encoder, report=report,
                           descriptors=descriptors)


@pytest.fixture(scope="module")
def vmap(built):
    return VprMap.load(built.path)


@pytest.fixture
def map_copy(built, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(built.path, dst)
    return dst


# --------------------------------------------------------------------------------------------
# round trip
# --------------------------------------------------------------------------------------------

def test_build_report(built):
    r = built.report
    assert r.path == os.path.abspath(built.path)
    assert r.keyframes == len(FRAMES)
    assert r.skipped == []
    assert r.geotagged is True
    assert r.pca_fitted is False  # 6 images < pca_min_images
    assert r.descriptor_dim == K * 512 == built.descriptors.shape[1]
    assert sorted(os.listdir(built.path)) == sorted(
        [map_store.MAP_YAML, map_store.KEYFRAMES_DB, map_store.INDEX_FILE, map_store.ENCODER_FILE])


def test_load_round_trip_keyframes(vmap, built, lund_dir):
    assert len(vmap) == len(vmap.keyframes) == len(FRAMES)
    assert [k.id for k in vmap.keyframes] == list(range(len(FRAMES)))
    assert [k.frame for k in vmap.keyframes] == list(FRAMES)
    assert [k.image_path for k in vmap.keyframes] == [os.path.abspath(lund_dir / f"{i:02d}.jpg") for i in FRAMES]

    gps = [exif_gps_pillow(lund_dir / f"{i:02d}.jpg") for i in FRAMES]
    # the datum is the first map image's fix
    assert vmap.datum is not None
    assert (vmap.datum.lat, vmap.datum.lon, vmap.datum.alt) == pytest.approx(gps[0], abs=1e-9)
    for kf, (lat, lon, alt) in zip(vmap.keyframes, gps):
        assert (kf.lat, kf.lon, kf.alt) == pytest.approx((lat, lon, alt), abs=1e-9)
        e, n, u = pymap3d.geodetic2enu(lat, lon, alt, vmap.datum.lat, vmap.datum.lon, vmap.datum.alt)
        assert (kf.x, kf.y, kf.z) == pytest.approx((float(e), float(n), float(u)), abs=1e-6)
        assert (kf.qx, kf.qy, kf.qz, kf.qw) == (0.0, 0.0, 0.0, 1.0)
        assert math.isnan(kf.stamp)
    pos = vmap.positions
    assert pos.shape == (len(FRAMES), 3) and vmap.has_positions
    assert pos[0] == pytest.approx([0.0, 0.0, 0.0], abs=1e-6)
    # lund 02 -> 12 walks about 45 m north-west
    assert 35.0 < np.hypot(*pos[-1, :2]) < 60.0
    assert pos[-1, 1] > 30.0 and pos[-1, 0] < 0.0


def test_index_holds_the_descriptors(vmap, built):
    idx = vmap.index
    n, d = len(FRAMES), K * 512
    assert idx.ntotal == n and idx.d == d
    stored = idx.reconstruct_n(0, n)
    np.testing.assert_allclose(stored, built.descriptors, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(stored, axis=1), 1.0, atol=1e-4)
    scores, ids = idx.search(stored, 2)
    assert list(ids[:, 0]) == list(range(n))  # every map image finds itself first
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-4)
    assert (scores[:, 1] < 0.999).all()  # and the images are distinct


def test_map_yaml_fingerprint_and_datum(built, vgg_path, lund_dir):
    with open(os.path.join(built.path, "map.yaml")) as f:
        meta = yaml.safe_load(f)
    assert meta["format"] == "vpr_localizer.map"
    assert meta["format_version"] == map_store.FORMAT_VERSION == 1
    assert meta["frame_id"] == "map"
    fp = meta["encoder"]
    assert set(fp) == FINGERPRINT_KEYS
    assert fp == built.encoder.fingerprint()
    assert fp["backbone"] == "vgg16" and fp["aggregator"] == "netvlad" and fp["preprocessing"] == "caffe_bgr"
    assert fp["weights_sha256"] == sha256(vgg_path)
    assert fp["image_size"] == list(SIZE)
    assert fp["num_clusters"] == K and fp["local_dim"] == 512
    assert fp["raw_dim"] == fp["descriptor_dim"] == K * 512 and fp["pca_dim"] == 0
    assert len(fp["params_sha256"]) == 64
    lat, lon, alt = exif_gps_pillow(lund_dir / "02.jpg")
    assert set(meta["datum"]) == {"lat", "lon", "alt"}
    datum = (meta["datum"]["lat"], meta["datum"]["lon"], meta["datum"]["alt"])
    assert datum == pytest.approx((lat, lon, alt), abs=1e-9)
    assert meta["counts"] == {"keyframes": len(FRAMES), "descriptor_dim": K * 512}
    for name in (map_store.KEYFRAMES_DB, map_store.INDEX_FILE, map_store.ENCODER_FILE):
        p = os.path.join(built.path, name)
        assert meta["files"][name] == {"bytes": os.path.getsize(p), "sha256": sha256(p)}
    assert meta["build"]["weights"] == os.path.abspath(vgg_path)
    assert meta["build"]["index"] == "flat" and meta["build"]["images"] == len(FRAMES)


def test_encoder_for_map_rebuilds_the_encoder(vmap, built):
    enc = encoder_for_map(vmap, device="cpu")
    assert enc.fingerprint() == vmap.fingerprint == built.encoder.fingerprint()
    paths = [vmap.keyframes[i].image_path for i in (0, 3)]
    res = enc.encode_paths(paths)
    assert res.ok == [0, 1] and res.skipped == []
    np.testing.assert_allclose(res.descriptors, vmap.index.reconstruct_n(0, len(FRAMES))[[0, 3]], atol=1e-5)


# --------------------------------------------------------------------------------------------
# fingerprint mismatch
# --------------------------------------------------------------------------------------------

def test_fingerprint_mismatch_other_num_clusters(vmap, vgg_path):
    other = Encoder(small_config(vgg_path, num_clusters=4))
    other.fit_aggregator([k.image_path for k in vmap.keyframes[:2]])
    with pytest.raises(FingerprintMismatchError) as ei:
        vmap.check_fingerprint(other.fingerprint())
    msg = str(ei.value)
    assert "num_clusters: map 8 vs encoder 4" in msg
    assert "raw_dim: map 4096 vs encoder 2048" in msg
    assert "image_size" not in msg and "weights_sha256" not in msg
    assert isinstance(ei.value, MapError)


def test_fingerprint_mismatch_other_image_size(vmap, vgg_path):
    other = Encoder(small_config(vgg_path, image_size=(160, 120)))
    other.fit_aggregator([k.image_path for k in vmap.keyframes[:2]])
    with pytest.raises(FingerprintMismatchError) as ei:
        vmap.check_fingerprint(other.fingerprint())
    msg = str(ei.value)
    assert "image_size: map [128, 96] vs encoder [160, 120]" in msg
    assert "num_clusters" not in msg and "weights_sha256" not in msg
    # The map's aggregator has no PCA, i.e. only resolution-independent NetVLAD parameters: it
    # loads at another input size (as a trained checkpoint does), but the result is still not the
    # map's encoder.
    assert vmap.encoder_checkpoint["pca"] is None
    other.load_checkpoint_state(vmap.encoder_checkpoint)
    with pytest.raises(FingerprintMismatchError, match="image_size"):
        vmap.check_fingerprint(other.fingerprint())
    # A checkpoint with PCA (fitted on descriptors of one input size) does not load at another.
    from vpr_localizer.models.pca import PCAWhitening

    other.pca = PCAWhitening.fit(np.random.default_rng(0).standard_normal((12, other.raw_dim)).astype(np.float32), 4)
    with pytest.raises(WeightsError, match="image_size"):
        Encoder(small_config(vgg_path)).load_checkpoint_state(other.checkpoint_state())


@pytest.fixture
def perturbed_weights(vgg_path, tmp_path):
    sd = torch.load(vgg_path, map_location="cpu", weights_only=True)
    key = sorted(sd)[0]
    sd[key] = sd[key] + 1e-3
    out = tmp_path / "vgg16_perturbed.pth"
    torch.save(sd, out)
    return out


def test_fingerprint_mismatch_other_weights(vmap, vgg_path, perturbed_weights):
    assert sha256(perturbed_weights) != sha256(vgg_path)
    with pytest.raises(FingerprintMismatchError) as ei:
        encoder_for_map(vmap, weights=str(perturbed_weights), device="cpu")
    assert "weights_sha256" in str(ei.value)

    other = Encoder(small_config(vgg_path, weights=str(perturbed_weights)))
    other.fit_aggregator([k.image_path for k in vmap.keyframes[:2]])
    with pytest.raises(FingerprintMismatchError) as ei:
        vmap.check_fingerprint(other.fingerprint())
    msg = str(ei.value)
    # sha256 fields are shortened to 12 hex digits in the message
    assert f"weights_sha256: map {sha256(vgg_path)[:12]} vs encoder {sha256(perturbed_weights)[:12]}" in msg
    assert "num_clusters" not in msg and "image_size" not in msg


@pytest.mark.parametrize("key,value", [("pca_dim", 256), ("preprocessing", "torchvision"),
                                       ("descriptor_dim", 256), ("params_sha256", "0" * 64),
                                       ("backbone", "efficientnet_lite0")])
def test_check_fingerprint_names_the_modified_key(vmap, key, value):
    fp = dict(vmap.fingerprint)
    vmap.check_fingerprint(dict(fp))  # identical: no error
    fp[key] = value
    with pytest.raises(FingerprintMismatchError) as ei:
        vmap.check_fingerprint(fp)
    msg = str(ei.value)
    assert f"{key}: map " in msg
    assert msg.count(" vs encoder ") == 1  # only the modified key is listed
    assert vmap.path in msg


def test_check_fingerprint_names_missing_and_extra_keys(vmap):
    fp = dict(vmap.fingerprint)
    del fp["local_dim"]
    fp["mask"] = "static"
    with pytest.raises(FingerprintMismatchError) as ei:
        vmap.check_fingerprint(fp)
    msg = str(ei.value)
    assert "local_dim: map 512 vs encoder None" in msg
    assert "mask: map None vs encoder static" in msg


# --------------------------------------------------------------------------------------------
# truncated / corrupt maps
# --------------------------------------------------------------------------------------------

def _truncate_index(d):
    p = d / "index.faiss"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def _delete_keyframes(d):
    (d / "keyframes.sqlite").unlink()


def _flip_encoder_byte(d):
    p = d / "encoder.pt"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))


def _delete_map_yaml(d):
    (d / "map.yaml").unlink()


def _bump_format_version(d):
    p = d / "map.yaml"
    meta = yaml.safe_load(p.read_text())
    meta["format_version"] = 2
    p.write_text(yaml.safe_dump(meta, sort_keys=False))


@pytest.mark.parametrize("damage,expected", [
    (_truncate_index, r"truncated or corrupt: index\.faiss has \d+ bytes"),
    (_delete_keyframes, r"incomplete: keyframes\.sqlite is missing"),
    (_flip_encoder_byte, r"encoder\.pt does not match its SHA-256"),
    (_delete_map_yaml, r"no map\.yaml"),
    (_bump_format_version, r"map\.yaml: map format version 2 is not supported"),
], ids=["truncated-index", "no-keyframes", "flipped-encoder-byte", "no-map-yaml", "format-version"])
def test_damaged_map_raises_map_error_naming_the_file(map_copy, damage, expected):
    VprMap.load(str(map_copy))  # the undamaged copy loads
    size_before = (map_copy / "encoder.pt").stat().st_size
    damage(map_copy)
    if damage is _flip_encoder_byte:
        assert (map_copy / "encoder.pt").stat().st_size == size_before
    with pytest.raises(MapError, match=expected) as ei:
        VprMap.load(str(map_copy))
    assert str(map_copy) in str(ei.value)
    assert not isinstance(ei.value, FingerprintMismatchError)


def test_nonexistent_map_raises_map_error(tmp_path):
    missing = tmp_path / "no_such_map"
    with pytest.raises(MapError, match="map not found") as ei:
        VprMap.load(str(missing))
    assert str(missing) in str(ei.value)
    # a file is not a map directory either
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(MapError):
        VprMap.load(str(f))


def test_corrupt_files_without_hash_check(map_copy):
    """With verify_hashes=False the readers themselves must turn garbage into MapError."""
    idx = map_copy / "index.faiss"
    idx.write_bytes(b"\0" * idx.stat().st_size)
    with pytest.raises(MapError, match=r"index\.faiss"):
        VprMap.load(str(map_copy), verify_hashes=False)
    with pytest.raises(MapError, match=r"index\.faiss does not match its SHA-256"):
        VprMap.load(str(map_copy))


def test_garbage_keyframes_db_without_hash_check(map_copy):
    db = map_copy / "keyframes.sqlite"
    db.write_bytes(b"x" * db.stat().st_size)
    with pytest.raises(MapError, match=r"keyframes\.sqlite"):
        VprMap.load(str(map_copy), verify_hashes=False)


def test_index_of_another_size_is_inconsistent(map_copy, vmap):
    """A mixed-up map (index of 5 descriptors, 6 keyframes) whose map.yaml matches its files."""
    import faiss

    faiss.write_index(build_index(vmap.index.reconstruct_n(0, 5)), str(map_copy / "index.faiss"))
    p = map_copy / "map.yaml"
    meta = yaml.safe_load(p.read_text())
    f = map_copy / "index.faiss"
    meta["files"]["index.faiss"] = {"bytes": f.stat().st_size, "sha256": sha256(f)}
    p.write_text(yaml.safe_dump(meta, sort_keys=False))
    with pytest.raises(MapError, match="6 keyframes but 5 descriptors"):
        VprMap.load(str(map_copy))


def test_malformed_files_entry_in_map_yaml_is_map_error(map_copy):
    p = map_copy / "map.yaml"
    meta = yaml.safe_load(p.read_text())
    meta["files"]["index.faiss"] = 5
    p.write_text(yaml.safe_dump(meta, sort_keys=False))
    with pytest.raises(MapError, match=r"index\.faiss"):
        VprMap.load(str(map_copy))


# --------------------------------------------------------------------------------------------
# atomic writing
# --------------------------------------------------------------------------------------------

def _write(vmap, path, n=None, overwrite=False):
    n = len(vmap) if n is None else n
    index = build_index(vmap.index.reconstruct_n(0, n))
    return write_map(str(path), vmap.keyframes[:n], index, vmap.encoder_checkpoint, vmap.fingerprint,
                     vmap.datum, extra={"build": vmap.meta["build"]}, overwrite=overwrite)


def test_write_refuses_existing_path_without_overwrite(map_copy, vmap):
    before = dir_digest(map_copy)
    with pytest.raises(MapError, match="already exists") as ei:
        _write(vmap, map_copy, n=3)
    assert "--overwrite" in str(ei.value)
    assert dir_digest(map_copy) == before
    assert len(VprMap.load(str(map_copy))) == len(FRAMES)
    assert leftovers(map_copy) == []


def test_overwrite_replaces_the_map_and_leaves_no_siblings(map_copy, vmap):
    assert _write(vmap, map_copy, n=3, overwrite=True) == str(map_copy)
    new = VprMap.load(str(map_copy))
    assert len(new) == 3 and new.index.ntotal == 3
    assert [k.frame for k in new.keyframes] == list(FRAMES[:3])
    assert new.fingerprint == vmap.fingerprint and new.datum == vmap.datum
    np.testing.assert_allclose(new.index.reconstruct_n(0, 3), vmap.index.reconstruct_n(0, 3), atol=0)
    assert leftovers(map_copy) == []
    assert sorted(os.listdir(map_copy.parent)) == ["copy"]


def test_written_map_equals_the_source(tmp_path, vmap):
    out = tmp_path / "sub" / "rewritten"  # parent directories are created
    _write(vmap, out)
    again = VprMap.load(str(out))

    def fields_of(k):  # NaN-aware comparison of every keyframe field
        return tuple(None if isinstance(v, float) and math.isnan(v) else v for v in vars(k).values())

    assert [fields_of(k) for k in again.keyframes] == [fields_of(k) for k in vmap.keyframes]
    assert [k.image_path for k in again.keyframes] == [k.image_path for k in vmap.keyframes]
    assert again.meta["encoder"] == vmap.meta["encoder"] and again.meta["datum"] == vmap.meta["datum"]


class SimulatedFailure(RuntimeError):
    pass


@pytest.mark.parametrize("existing", [True, False], ids=["over-existing-map", "new-path"])
def test_failure_mid_write_keeps_the_previous_map(map_copy, vmap, monkeypatch, existing):
    import faiss

    target = map_copy if existing else map_copy.parent / "fresh"
    before = dir_digest(map_copy)

    def boom(index, path):
        assert ".tmp-" in os.fspath(path)  # the writer only ever writes into its temporary dir
        raise SimulatedFailure("simulated disk full while writing the index")

    monkeypatch.setattr(faiss, "write_index", boom)
    with pytest.raises((SimulatedFailure, MapError), match="simulated disk full"):
        _write(vmap, target, n=3, overwrite=True)
    monkeypatch.undo()

    assert dir_digest(map_copy) == before
    assert len(VprMap.load(str(map_copy))) == len(FRAMES)
    assert os.path.exists(target) == existing
    assert leftovers(target) == []
    assert sorted(os.listdir(map_copy.parent)) == ["copy"]


def test_failed_final_rename_keeps_the_previous_map(map_copy, vmap, monkeypatch):
    real_rename = os.rename

    def rename(src, dst):
        if ".tmp-" in os.fspath(src):
            raise OSError(28, "No space left on device (simulated)")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises((OSError, MapError)):
        _write(vmap, map_copy, n=3, overwrite=True)
    monkeypatch.undo()
    assert len(VprMap.load(str(map_copy))) == len(FRAMES)
    assert leftovers(map_copy) == []


def test_unwritable_map_path_is_map_error(tmp_path, vmap):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(MapError, match="a_file"):
        _write(vmap, blocker / "map")


def test_writer_rejects_inconsistent_input(tmp_path, vmap):
    index = build_index(vmap.index.reconstruct_n(0, 3))
    with pytest.raises(MapError, match="index holds 3 descriptors but 6 keyframes"):
        write_map(str(tmp_path / "a"), vmap.keyframes, index, {}, vmap.fingerprint, None)
    with pytest.raises(MapError, match="ids must be 0..N-1"):
        write_map(str(tmp_path / "b"), vmap.keyframes[1:4], index, {}, vmap.fingerprint, None)
    assert sorted(os.listdir(tmp_path)) == []
