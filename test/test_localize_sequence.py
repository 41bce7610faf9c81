"""Sequence localisation through :class:`~vpr_localizer.localization.localize.Localizer` (SeqSLAM over
the map's similarity matrix) on hand-built in-memory maps, and the ``localize --sequence`` command.

The map is a straight route of 60 keyframes 2 m apart with random unit descriptors. Each query
frame t of a traversal at one keyframe per frame is the true keyframe's descriptor plus noise, and
every third frame is aliased: its descriptor is a far keyframe's (perceptual aliasing), so
single-frame retrieval is wrong there by construction, while a straight sequence is not.
"""
from __future__ import annotations

import numpy as np
import pytest

from vpr_localizer.errors import ConfigError
from vpr_localizer.localization.localize import Localizer, LocalizerConfig
from vpr_localizer.localization.sequence import SequenceConfig
from vpr_localizer.localization.tracking import TrackingConfig
from vpr_localizer.mapping.index import build_index
from vpr_localizer.mapping.store import Keyframe, VprMap

N_MAP, DIM, SPACING_M = 60, 32, 2.0


def route_map(desc: np.ndarray) -> VprMap:
    kfs = [Keyframe(id=i, x=SPACING_M * i, y=0.0, z=0.0, frame=i, image_path=f"kf{i:02d}.jpg")
           for i in range(len(desc))]
    meta = {"format": "vpr_localizer.map", "format_version": 1, "encoder": {}, "datum": None}
    return VprMap("/nonexistent/in-memory-map", meta, kfs, build_index(desc, "flat"), {})


@pytest.fixture(scope="module")
def scene():
    rng = np.random.default_rng(7)
    desc = rng.normal(size=(N_MAP, DIM)).astype(np.float32)
    desc /= np.linalg.norm(desc, axis=1, keepdims=True)
    truth = np.arange(10, 40)  # query frame t sees keyframe 10 + t
    q = desc[truth] + 0.12 * rng.normal(size=(len(truth), DIM)).astype(np.float32)
    aliased = np.arange(len(truth)) % 3 == 2
    q[aliased] = desc[(truth[aliased] + 25) % N_MAP]  # looks exactly like a keyframe 50 m away
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return route_map(desc), desc, q, truth, aliased


def test_similarity_matrix_is_every_inner_product(scene):
    vmap, desc, q, _, _ = scene
    sim = Localizer(vmap).similarity_matrix(q)
    assert sim.shape == (len(q), N_MAP) and sim.dtype == np.float32
    np.testing.assert_allclose(sim, q @ desc.T, atol=1e-5)


def test_sequence_fixes_the_aliased_frames_single_frame_gets_wrong(scene):
    vmap, _, q, truth, aliased = scene
    loc = Localizer(vmap, LocalizerConfig(top_k=5))
    single = np.array([e.best_id for e in loc.localize(q)])
    assert (single[aliased] == truth[aliased]).sum() == 0  # wrong by construction
    ests = loc.localize_sequence(q, SequenceConfig(seq_len=10, top_k=10))
    seq = np.array([e.best_id for e in ests])
    settled = np.arange(len(q)) >= 9  # a full 10-frame sequence exists
    assert np.abs(seq[settled] - truth[settled]).max() <= 1
    assert (seq[aliased & settled] == truth[aliased & settled]).all()
    # the estimate is a pose, not only an id: within one keyframe spacing of the truth
    xs = np.array([e.x for e in ests])
    assert np.abs(xs[settled] - SPACING_M * truth[settled]).max() <= SPACING_M + 1e-6


def test_sequence_candidates_are_the_matchers_ranking(scene):
    from vpr_localizer.localization.sequence import match_sequences

    vmap, desc, q, _, _ = scene
    cfg = SequenceConfig(seq_len=5, top_k=7)
    scores, ids = Localizer(vmap).sequence_candidates(q, cfg)
    assert ids.shape == scores.shape == (len(q), 7)
    ref = match_sequences(q @ desc.T, SequenceConfig(seq_len=5, top_k=7, similarity=True))
    np.testing.assert_array_equal(ids, ref.topk_indices)
    np.testing.assert_allclose(scores, -ref.topk_scores, atol=1e-6)
    assert (np.diff(scores, axis=1) <= 0).all()  # best first


def test_sequence_top_k_is_capped_at_the_map_size():
    rng = np.random.default_rng(1)
    desc = rng.normal(size=(4, DIM)).astype(np.float32)
    desc /= np.linalg.norm(desc, axis=1, keepdims=True)
    scores, ids = Localizer(route_map(desc)).sequence_candidates(desc, SequenceConfig(seq_len=3, top_k=10))
    assert ids.shape == (4, 4)
    assert set(ids.reshape(-1).tolist()) <= {-1, 0, 1, 2, 3}  # -1: trajectories off the map
    assert ids[-1, 0] == 3 and np.isfinite(scores[-1, 0])
    assert (scores[ids == -1] == -np.inf).all()


def test_bad_sequence_parameters_are_a_config_error():
    with pytest.raises(ConfigError):
        SequenceConfig(seq_len=0)
    with pytest.raises(ConfigError):
        SequenceConfig(v_min=1.5, v_max=1.0)


def test_online_filter_scoring_on_the_aliased_route(scene):
    """evaluation.online.filter_entry runs the node's filter frame by frame: after it converges its
    MAP keyframe is right (+-1) on the aliased frames too, where single-frame retrieval is wrong."""
    from vpr_localizer.evaluation.evaluate import recall_at_n
    from vpr_localizer.evaluation.online import filter_entry

    vmap, _, q, truth, aliased = scene
    rel = np.zeros((len(q), N_MAP), bool)
    for t, kf in enumerate(truth):
        rel[t, kf - 1:kf + 2] = True  # +-1 keyframe
    single = recall_at_n(Localizer(vmap).retrieve(q, 10)[1], rel, (1,))["at"][1]["correct"]
    out = filter_entry(Localizer(vmap, LocalizerConfig(top_k=10)), q, {"kf+-1": rel}, recall_at_n, (1, 5),
                       TrackingConfig(top_k=10, temperature=0.05, floor=0.05))  # as test_tracking.FILTER_CFG
    first = out["converged_after_frames"]
    assert first is not None and first <= 5
    conv = out["recall_converged"]["kf+-1"]["at"][1]
    assert conv["total"] == len(q) - first and conv["correct"] == conv["total"]
    assert single == int((~aliased).sum())  # single frame: exactly the aliased frames are wrong
    assert out["recall"]["kf+-1"]["at"][1]["correct"] > single
