"""Patch-NetVLAD re-ranking through the real ROS 2 graph: the Lund bag replayed through
``attention_node`` (``publish_patch_netvlad``) -> ``vpr_localizer`` (``rerank.mode``) with a map
of the 14 even Lund frames built with patch descriptors (VGG16 160x120 = 7x10 cells, NetVLAD K=16,
patch sizes 2 and 5, 64-D patch PCA). Every pose equals the offline
:meth:`Localizer.localize_reranked` on the same frames, and the node reports what re-ranking did.

Measured here (identical on repeated runs): re-ranking changes the first place on 6/15 frames
(performance mode) and 10/15 (speed mode) and the mean error goes from 13.20 m (single-frame)
to 15.85 m / 17.37 m. On a 7x10-cell grid the patches see too little (the README's Lund row,
640x480 = 30x40 cells, is where re-ranking pays); this test checks the node's plumbing, the
accuracy is measured by ``vpr-localizer evaluate --rerank`` at full size.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from conftest import CLUSTERS, IMAGE_SIZE, RELIABLE_IMAGE, VGG_FILE, graph_probe, replay_lund, wait_for, write_params

pytestmark = pytest.mark.integration

PATCH_SIZES = (2, 5)   # 8 does not fit the 7-cell-high grid of 160x120 px
PATCH_DIM = 64


@pytest.fixture(scope="module")
def patch_lund(lund, datasets_dir, weights_dir, data_file, tmp_path_factory):
    """The session's Lund fixture with its map rebuilt with patch descriptors, and the offline
    re-ranked estimates of the 15 query frames in both modes."""
    from vpr_localizer.io.records import load_records
    from vpr_localizer.localization.localize import Localizer, LocalizerConfig, encoder_for_map
    from vpr_localizer.localization.rerank import RerankConfig, query_patch_encoder
    from vpr_localizer.mapping.build import build_map
    from vpr_localizer.mapping.store import VprMap
    from vpr_localizer.models.config import EncoderConfig
    from vpr_localizer.models.encoder import Encoder
    from vpr_localizer.models.patch_encoder import PatchSettings

    tmp = tmp_path_factory.mktemp("rerank_graph")
    map_recs = load_records(str(datasets_dir / "lund_gps"), gps="exif", parity="even")
    cfg = EncoderConfig(backbone="vgg16", weights=str(data_file(weights_dir / VGG_FILE)), image_size=IMAGE_SIZE,
                        num_clusters=CLUSTERS, device="cpu")
    build_map(map_recs, Encoder(cfg), str(tmp / "map"), progress=False,
              patches=PatchSettings(patch_sizes=PATCH_SIZES, dim=PATCH_DIM, pca_images=14, pca_samples=1024))
    vmap = VprMap.load(str(tmp / "map"))
    enc = encoder_for_map(vmap, device="cpu", batch_size=1)
    penc = query_patch_encoder(enc, vmap)
    patches = []
    res = enc.encode_paths([r.path for r in lund.records],
                           on_batch=lambda idx, e: patches.extend(penc.extract(e.features)))
    assert res.ok == list(range(15))
    descs = res.descriptors
    loc = Localizer(vmap, LocalizerConfig.from_dict(lund.params["vpr_localizer"]["ros__parameters"]["localizer"]))
    single = loc.localize(descs)
    reranked = {mode: loc.localize_reranked(descs, patches, RerankConfig(mode=mode, k=14))
                for mode in ("ransac", "spatial")}
    truth = np.array([vmap.datum.to_enu(r.lat, r.lon, r.alt)[:2] for r in lund.records])
    return SimpleNamespace(lund=SimpleNamespace(**{**vars(lund), "map": str(tmp / "map")}), single=single,
                           reranked=reranked, truth=truth)


@pytest.mark.parametrize("mode", ["ransac", "spatial"])
def test_node_reranks_as_offline(patch_lund, mode, ros_env, tmp_path):
    from vpr_ros.graph import Graph

    ref, single = patch_lund.reranked[mode], patch_lund.single
    lund = patch_lund.lund
    changed = sum(int(r.ids[0]) != int(s.ids[0]) for r, s in zip(ref, single))
    assert changed >= 1, "re-ranking changes no first place on these frames: the test would prove nothing"
    params = write_params(lund, tmp_path / "params.yaml",
                          attention={**RELIABLE_IMAGE, "publish_patch_netvlad": True, "publish_attention": False},
                          localizer={"rerank": {"mode": mode, "k": 14, "wait_s": 5.0}})
    graph = Graph(params)
    probe = None
    try:
        probe = graph_probe(graph)
        att_node, loc_node = replay_lund(graph, probe, lund, f"{mode}: ")
        assert loc_node.reranker is not None and loc_node.unranked_frames == 0
        assert loc_node.reranked_frames == 15 and loc_node.changed_first == changed
        poses = probe.by_stamp("pose")
        for i, key in enumerate(lund.stamps):
            assert len(poses[key]) == 1
            p, est = poses[key][0].pose.pose.position, ref[i]
            assert abs(p.x - est.x) <= 1e-3 and abs(p.y - est.y) <= 1e-3, (mode, lund.records[i].name, p, est)
        assert wait_for(lambda: len(probe.statuses("vpr_localizer")) >= 15, timeout=10.0)
        diag = probe.last_status("vpr_localizer")
        assert diag["reranked"] == "True" and int(diag["reranked_frames"]) == 15
        assert float(diag["rerank_ms"]) > 0 and int(diag["frames_without_patches"]) == 0
        err = lambda ests: np.hypot(*(np.array([[e.x, e.y] for e in ests]) - patch_lund.truth).T)  # noqa: E731
        print(f"\n[Lund graph, {mode}] first place changed on {changed}/15 frames; mean error "
              f"{err(single).mean():.2f} m single-frame -> {err(ref).mean():.2f} m re-ranked")
    finally:
        if probe is not None:
            probe.close()
        graph.shutdown()


def test_rerank_without_patches_in_time_keeps_global_order(patch_lund, ros_env, tmp_path):
    """attention_node not asked for patches: every frame keeps the global order (= the single-frame
    poses), counted and warned about, nothing dropped."""
    from vpr_ros.graph import Graph

    lund = patch_lund.lund
    params = write_params(lund, tmp_path / "params.yaml", attention={**RELIABLE_IMAGE, "publish_attention": False},
                          localizer={"rerank": {"mode": "spatial", "k": 14, "wait_s": 0.05}})
    graph = Graph(params)
    probe = None
    try:
        probe = graph_probe(graph)
        _, loc_node = replay_lund(graph, probe, lund, "no patches: ")
        assert loc_node.unranked_frames == 15 and loc_node.reranked_frames == 0
        poses = probe.by_stamp("pose")
        for i, key in enumerate(lund.stamps):
            p, est = poses[key][0].pose.pose.position, patch_lund.single[i]
            assert abs(p.x - est.x) <= 1e-3 and abs(p.y - est.y) <= 1e-3
    finally:
        if probe is not None:
            probe.close()
        graph.shutdown()


def test_rerank_on_a_map_without_patches_is_fatal(lund, ros_env, tmp_path):
    from vpr_localizer.errors import MapError
    from vpr_ros.graph import Graph

    params = write_params(lund, tmp_path / "params.yaml", localizer={"rerank": {"mode": "ransac"}},
                          nodes=("vpr_localizer",))
    with pytest.raises(MapError, match="--patches"):
        Graph(params, names=["vpr_localizer"])
