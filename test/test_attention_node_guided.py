"""attention_node with a guided map (static mask + segmentation stream), in a real ROS 2 graph.

A small guided map (6 even Lund frames, VGG16 at 160x120, NetVLAD K=8, no PCA, static mask +
segmentation stream, ESPNetv2 labels at 256x128) is built into a temporary directory. The graph
runs only ``attention_node``; a test node publishes a real Lund image and, with the same stamp,
its ESPNetv2 labels on ``segmentation/labels``. The node's descriptor must equal the offline
``encode_images([rgb], labels=[labels])`` (and differ with other labels), its ``vpr/attention``
must be the static-mask weight map, and a frame without labels (or ``use_labels: false``) must
be encoded with the encoder's own segmentation, i.e. equal ``encode_images([rgb])``.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from conftest import REPO_ROOT, MessageProbe, attention_has_labels, in_fresh_thread, wait_for

IMAGE_SIZE = (160, 120)
CLUSTERS = 8
SEG_SIZE = (256, 128)
CAMERA_WH = (320, 240)      # size of the published camera image (and of its labels)
ESPNETV2 = "espnetv2_s_2.0_city_1024x512.pth"
TOL = 1e-5


@pytest.fixture(scope="module")
def guided(datasets_dir, weights_dir, vgg_path, data_file, tmp_path_factory):
    """Guided map + a Lund query image that has sky/dynamic pixels + its ESPNetv2 labels."""
    import torch

    from vpr_localizer.models.config import EncoderConfig
    from vpr_localizer.models.encoder import Encoder
    from vpr_localizer.io.image_files import load_image, resize_image
    from vpr_localizer.localization.localize import encoder_for_map
    from vpr_localizer.mapping.store import VprMap
    from vpr_localizer.mapping.build import build_map
    from vpr_localizer.io.records import load_records
    from vpr_localizer.segmentation.classes import static_weight
    from vpr_localizer.segmentation.registry import make_backend

    seg_weights = data_file(weights_dir / ESPNETV2)
    images = datasets_dir / "lund_gps"
    tmp = tmp_path_factory.mktemp("guided_node")
    recs = load_records(str(images), gps="exif", parity="even")[:6]
    cfg = EncoderConfig(backbone="vgg16", weights=str(vgg_path), image_size=IMAGE_SIZE, num_clusters=CLUSTERS,
                        pca_dim=0, static_mask=True, seg_stream=True, segmentation="espnetv2",
                        segmentation_weights=str(seg_weights), segmentation_size=SEG_SIZE, device="cpu")
    with torch.no_grad():
        build_map(recs, Encoder(cfg), str(tmp / "map"), progress=False)
    encoder = encoder_for_map(VprMap.load(str(tmp / "map")), device="cpu", batch_size=1)
    assert encoder.config.guided and encoder.config.needs_labels and not encoder.config.attention

    backend = make_backend("espnetv2", weights=str(seg_weights), device="cpu", input_size=SEG_SIZE)
    query = None
    for rec in load_records(str(images), gps="exif", parity="odd"):
        rgb = resize_image(load_image(rec.path), CAMERA_WH)
        labels = np.asarray(backend(rgb), np.uint8)
        assert labels.shape == (CAMERA_WH[1], CAMERA_WH[0])
        masked = float((static_weight(labels) == 0).mean())   # sky / dynamic pixels
        if not 0.05 <= masked <= 0.8:
            continue
        grid = encoder.stream_features(np.stack([resize_image(rgb, IMAGE_SIZE)]), [labels]).static
        if float(grid.min()) == 0.0 and float(grid.max()) > 0.5:
            query = SimpleNamespace(name=rec.name, rgb=rgb, labels=labels, masked=masked)
            break
    assert query is not None, "no odd Lund frame with sky/dynamic pixels for the static mask"
    params = yaml.safe_load((REPO_ROOT / "config" / "lund_graph.yaml").read_text())
    return SimpleNamespace(map=str(tmp / "map"), params=params, encoder=encoder, query=query,
                           seg_weights=str(seg_weights))


def _params(guided, path, **overrides) -> str:
    """config/lund_graph.yaml's attention_node section with the guided map, cpu and reliable input QoS."""
    p = dict(guided.params["attention_node"]["ros__parameters"])
    p.update({"map_path": guided.map, "device": "cpu", "publish_attention": True,
              "qos_overrides": {t: {"subscription": {"reliability": "reliable", "depth": 10}}
                                for t in ("/image", "/segmentation/labels")}}, **overrides)
    path.write_text(yaml.safe_dump({"attention_node": {"ros__parameters": p}}))
    return str(path)


def _descriptor(msg) -> np.ndarray:
    return np.frombuffer(bytes(msg.data), "<f4").reshape(1, -1)


class _Graph:
    """attention_node alone + a probe recording vpr/descriptor, vpr/attention and diagnostics, with
    image/labels publishers."""

    def __init__(self, params_file: str):
        from diagnostic_msgs.msg import DiagnosticArray
        from sensor_msgs.msg import Image

        from vpr_ros.graph import Graph
        from vpr_ros.qos import reliable_qos

        self.graph = Graph(params_file)
        self.probe = None
        try:
            assert self.graph.names == ["attention_node"]
            self.node = self.graph.node("attention_node")
            self.probe = MessageProbe(self.graph, {"descriptor": (Image, "vpr/descriptor"),
                                                   "attention": (Image, "vpr/attention"),
                                                   "diagnostics": (DiagnosticArray, "diagnostics")})
            self.pub_img = self.probe.node.create_publisher(Image, "image", reliable_qos())
            self.pub_lab = self.probe.node.create_publisher(Image, "segmentation/labels", reliable_qos())
            pubs = [self.pub_img] + ([self.pub_lab] if self.node.use_labels else [])
            assert wait_for(lambda: all(p.get_subscription_count() >= 1 for p in pubs)
                            and self.probe.node.count_publishers("vpr/attention") >= 1, timeout=15.0), "discovery"
        except BaseException:
            self.close()
            raise

    def send(self, rgb, stamp_s: float, labels=None, timeout: float = 60.0):
        """Publish labels (optional) then the image with the same stamp; wait for descriptor + attention."""
        from std_msgs.msg import Header

        from vpr_ros.convert import labels_to_msg, rgb_to_image_msg, sec_to_stamp

        key = (int(stamp_s), int(round((stamp_s % 1) * 1e9)))
        if labels is not None:
            self.pub_lab.publish(labels_to_msg(labels, Header(stamp=sec_to_stamp(stamp_s), frame_id="camera")))
            assert wait_for(lambda: attention_has_labels(self.node, key), timeout=10.0), \
                f"the node did not get the labels of frame {stamp_s}"
        self.pub_img.publish(rgb_to_image_msg(rgb, Header(stamp=sec_to_stamp(stamp_s), frame_id="camera")))
        assert wait_for(lambda: self.probe.stamped("descriptor", key) and self.probe.stamped("attention", key),
                        timeout=timeout), f"no descriptor/attention for frame {stamp_s}"
        descs, atts = self.probe.stamped("descriptor", key), self.probe.stamped("attention", key)
        assert len(descs) == len(atts) == 1, f"frame {stamp_s}: {len(descs)} descriptors, {len(atts)} attention images"
        return _descriptor(descs[0]), atts[0]

    def close(self):
        if self.probe is not None:
            self.probe.close()
        self.graph.shutdown()


@pytest.mark.integration
def test_weight_heatmap_is_the_static_mask(guided):
    """Pure (no ROS): the node's attention image of a guided encoder is the static-mask weight map."""
    import torch

    from attention_node.node import _JET, attention_heatmap, weight_heatmap
    from vpr_localizer.io.image_files import resize_image

    enc, q = guided.encoder, guided.query
    feats = enc.stream_features(np.stack([resize_image(q.rgb, enc.config.image_size)]), [q.labels])
    w = enc.attention_maps(feats)["image"]
    assert w is not None and torch.equal(w, feats.static)   # no attention module: the static mask
    heat = weight_heatmap(w[0, 0].numpy(), CAMERA_WH)
    assert heat.shape == (CAMERA_WH[1], CAMERA_WH[0], 3) and heat.dtype == np.uint8
    colours = {tuple(c) for c in heat.reshape(-1, 3)}
    assert tuple(_JET[0]) in colours and tuple(_JET[255]) in colours   # weight 0 (sky/cars) and full
    assert not np.array_equal(heat, attention_heatmap(feats.image[0], CAMERA_WH))

    # uniform weights -> all "full weight" (red); all zero -> all blue; scale does not matter
    assert (weight_heatmap(np.full((3, 4), 0.7), (8, 6)) == _JET[255]).all()
    assert (weight_heatmap(np.zeros((3, 4)), (8, 6)) == _JET[0]).all()
    m = np.random.default_rng(0).random((5, 7))
    np.testing.assert_array_equal(weight_heatmap(m, (70, 50)), weight_heatmap(3.0 * m, (70, 50)))
    with pytest.raises(ValueError):
        weight_heatmap(np.zeros((2, 3, 4)), (8, 6))


@pytest.mark.integration
def test_guided_node_uses_topic_labels(guided, ros_env, tmp_path, capfd):
    from attention_node.node import _JET, weight_heatmap
    from vpr_localizer.io.image_files import resize_image
    from vpr_localizer.segmentation.classes import IGNORE_ID

    q = guided.query
    g = _Graph(_params(guided, tmp_path / "params.yaml", use_labels=True, labels_wait_s=1.0))
    try:
        att = g.node
        assert att.needs_labels and att.encoder.config.seg_stream
        ignore = np.full_like(q.labels, IGNORE_ID)
        d_lab, a_lab = g.send(q.rgb, 10.0, labels=q.labels)
        d_ign, _ = g.send(q.rgb, 11.0, labels=ignore)
        d_own, _ = g.send(q.rgb, 12.0)                         # no labels: own segmentation after 1 s
        assert wait_for(lambda: att.worker.idle(), 10.0)
        enc = att.encoder
        ref_lab = in_fresh_thread(lambda: enc.encode_images([q.rgb], labels=[q.labels]))
        ref_ign = in_fresh_thread(lambda: enc.encode_images([q.rgb], labels=[ignore]))
        ref_own = in_fresh_thread(lambda: enc.encode_images([q.rgb]))
        np.testing.assert_allclose(d_lab, ref_lab, rtol=0, atol=TOL)
        np.testing.assert_allclose(d_ign, ref_ign, rtol=0, atol=TOL)
        np.testing.assert_allclose(d_own, ref_own, rtol=0, atol=TOL)
        assert np.abs(d_lab - d_ign).max() > 1e-3, "all-ignore labels gave the same descriptor"

        # vpr/attention: rgb8 at the camera size, the static-mask weight map (blue on sky/cars)
        assert a_lab.encoding == "rgb8" and (a_lab.width, a_lab.height) == CAMERA_WH
        heat = np.frombuffer(bytes(a_lab.data), np.uint8).reshape(CAMERA_WH[1], a_lab.step)[:, :3 * CAMERA_WH[0]]
        heat = heat.reshape(CAMERA_WH[1], CAMERA_WH[0], 3)
        feats = enc.stream_features(np.stack([resize_image(q.rgb, enc.config.image_size)]), [q.labels])
        expected = weight_heatmap(enc.attention_maps(feats)["image"][0, 0].numpy(), CAMERA_WH)
        assert np.abs(heat.astype(int) - expected.astype(int)).max() <= 1
        assert len({tuple(c) for c in heat.reshape(-1, 3)}) > 1, "constant attention image"
        blue = (heat == _JET[0]).all(axis=2)
        assert 0 < blue.mean() < 1, "no zero-weight (sky/dynamic) region in the attention image"

        assert (att.labelled_frames, att.unlabelled_frames) == (2, 1)
        assert (att.topic_label_frames, att.self_segmented_frames) == (2, 1)
        assert wait_for(lambda: g.probe.last_status("attention_node").get("self_segmented_frames") == "1", 10.0)
        diag = g.probe.last_status("attention_node")
        assert (diag["guided"], diag["static_mask"], diag["seg_stream"], diag["attention"]) == \
            ("True", "True", "True", "False")
        assert diag["topic_label_frames"] == "2" and diag["segmentation"] == "espnetv2"
        assert "falling back to the encoder's own espnetv2 segmentation" in capfd.readouterr().err
        print(f"\nguided attention_node on {q.name}: {100 * q.masked:.0f}% sky/dynamic pixels; "
              f"last frame {1e3 * att.worker.stats.last_seconds:.0f} ms")
    finally:
        g.close()


@pytest.mark.integration
def test_guided_node_segments_itself_without_use_labels(guided, ros_env, tmp_path):
    q = guided.query
    g = _Graph(_params(guided, tmp_path / "params.yaml", use_labels=False,
                       segmentation_weights=guided.seg_weights))
    try:
        att = g.node
        d, a = g.send(q.rgb, 20.0)
        assert g.pub_lab.get_subscription_count() == 0   # use_labels false: no labels subscription
        assert wait_for(lambda: att.worker.idle(), 10.0)
        ref = in_fresh_thread(lambda: att.encoder.encode_images([q.rgb]))
        np.testing.assert_allclose(d, ref, rtol=0, atol=TOL)
        assert a.encoding == "rgb8" and (a.width, a.height) == CAMERA_WH
        assert (att.topic_label_frames, att.self_segmented_frames) == (0, 1)
        assert att.labelled_frames == 0 and att.unlabelled_frames == 0
    finally:
        g.close()
