"""DINOv2 ViT-S/14 backbone (vpr_localizer.models.dinov2) on the real weight file and real images.

The weight file is ``../shared/weights/dinov2_vits14_imgfocus.pth``; when it is missing the tests
fail (they do not skip) naming the path. ``timm`` is a dependency of the backbone
(requirements.txt), so the reference comparison with timm's own ``forward_intermediates`` needs
nothing extra.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from vpr_localizer.errors import ConfigError, WeightsError
from vpr_localizer.files import load_state_dict_file
from vpr_localizer.io.image_files import load_image, resize_image
from vpr_localizer.models import dinov2
from vpr_localizer.models.config import EncoderConfig
from vpr_localizer.models.registry import backbone_names, backbone_spec, build_backbone

DINO_FILE = "dinov2_vits14_imgfocus.pth"
SIZE = (224, 112)  # (W, H): 16 x 8 patches


@pytest.fixture(scope="module")
def dino_path(weights_dir, data_file) -> Path:
    """``../shared/weights/dinov2_vits14_imgfocus.pth`` (fails the test when missing)."""
    return data_file(weights_dir / DINO_FILE)


@pytest.fixture(scope="module")
def dino_sd(dino_path):
    return load_state_dict_file(str(dino_path), "DINOv2")


@pytest.fixture(scope="module")
def backbone(dino_path):
    """The default ``dinov2_vits14`` backbone (block :data:`dinov2.DEFAULT_BLOCK`)."""
    return build_backbone("dinov2_vits14", str(dino_path))


@pytest.fixture(scope="module")
def gardens(datasets_dir, data_file):
    """Gardens Point day views: place -> [two RGB arrays]."""
    root = datasets_dir / "gardens_point_mini" / "images"
    return {p: [load_image(str(data_file(root / f"p{p}_v{v}_day.jpg"))) for v in (0, 1)] for p in (0, 1)}


def test_real_file_loads_strictly_and_completely(dino_sd, dino_path):
    body = dinov2.build_dinov2_vits14_body(dict(dino_sd), str(dino_path), block=dinov2.DEPTH - 1)
    loaded = body.vit.state_dict()
    # loaded strictly, then the final norm (unused for intermediate tokens) is dropped: every other
    # tensor of the file is in the model, bit for bit, except the training-only mask_token
    assert set(dino_sd) - set(loaded) == {"mask_token", "norm.weight", "norm.bias"}
    assert set(loaded) <= set(dino_sd)
    for k, v in loaded.items():
        assert torch.equal(v, dino_sd[k]), k
    n = sum(v.numel() for k, v in dino_sd.items() if k != "mask_token")
    assert abs(n / 1e6 - 22.06) < 0.01  # ViT-S/14: 22.06 M parameters (shared/weights/README.md)


@pytest.mark.parametrize("corrupt, words", [
    (lambda sd: sd.pop("blocks.3.attn.qkv.weight"), ["1 missing", "blocks.3.attn.qkv.weight"]),
    (lambda sd: sd.__setitem__("pos_embed", sd["pos_embed"][:, :100]), ["wrong shape", "pos_embed", "(1, 100, 384)"]),
    (lambda sd: sd.__setitem__("blocks.12.norm1.weight", torch.ones(384)), ["1 unexpected", "blocks.12.norm1.weight"]),
    (lambda sd: sd.__setitem__("patch_embed.proj.weight", torch.zeros(384, 3, 16, 16)),
     ["wrong shape", "patch_embed.proj.weight", "(384, 3, 14, 14)"]),
])
def test_state_dict_that_does_not_fit_raises_readable_weights_error(dino_sd, corrupt, words):
    sd = dict(dino_sd)
    corrupt(sd)
    with pytest.raises(WeightsError) as exc:
        dinov2.build_dinov2_vits14_body(sd, "bad.pth")
    msg = str(exc.value)
    assert msg.startswith("bad.pth: not a DINOv2 ViT-S/14 state dict"), msg
    assert all(w in msg for w in words), msg
    assert len(msg) < 400, msg  # one readable line, not torch's dump of every tensor


def test_corrupt_or_wrong_file_raises_weights_error(tmp_path, vgg_path):
    bad = tmp_path / "corrupt.pth"
    bad.write_bytes(b"\x00not a torch file" * 64)
    with pytest.raises(WeightsError, match="corrupt.pth"):
        build_backbone("dinov2_vits14", str(bad))
    with pytest.raises(WeightsError, match="not a DINOv2 ViT-S/14 state dict.*missing: cls_token"):
        build_backbone("dinov2_vits14", str(vgg_path))  # a real file of another network


def test_registry_entries():
    names = backbone_names()
    assert "dinov2_vits14" in names and all(f"dinov2_vits14_b{b}" in names for b in range(dinov2.DEPTH))
    spec = backbone_spec("dinov2_vits14")
    assert (spec.out_channels, spec.stride, spec.input_multiple) == (384, 14, 14)
    assert spec.default_preprocessing == "torchvision" and spec.weight_file == DINO_FILE
    assert f"block {dinov2.DEFAULT_BLOCK}" in spec.reference


def test_output_shape_dtype_and_preprocessing(backbone, gardens):
    img = resize_image(gardens[0][0], SIZE)
    x = backbone.preprocessing(img[None])
    assert backbone.preprocessing.name == "torchvision"  # RGB / 255, ImageNet mean / std
    with torch.no_grad():
        y = backbone(x)
    assert y.shape == (1, 384, SIZE[1] // 14, SIZE[0] // 14) and y.dtype == torch.float32
    assert torch.isfinite(y).all()
    assert backbone.name == "dinov2_vits14" and backbone.body.block == dinov2.DEFAULT_BLOCK
    assert len(backbone.body.vit.blocks) == dinov2.DEFAULT_BLOCK + 1  # later blocks are not computed


def test_tokens_equal_timm_forward_intermediates(dino_sd, dino_path, backbone, gardens):
    import timm

    ref = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, dynamic_img_size=True)
    ref.load_state_dict({k: v for k, v in dino_sd.items() if k != "mask_token"}, strict=True)
    ref.eval()
    imgs = np.stack([resize_image(gardens[p][0], SIZE) for p in (0, 1)])
    x = backbone.preprocessing(imgs)
    for block in (dinov2.DEFAULT_BLOCK, 5, dinov2.DEPTH - 1):
        mine = backbone if block == dinov2.DEFAULT_BLOCK else build_backbone(f"dinov2_vits14_b{block}", str(dino_path))
        with torch.no_grad():
            got = mine(x)
            want = ref.forward_intermediates(x, indices=[block], norm=False, output_fmt="NCHW",
                                             intermediates_only=True)[0]
        assert got.shape == want.shape == (2, 384, 8, 16)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_image_size_must_be_multiple_of_14(backbone):
    with pytest.raises(ConfigError, match=r"multiples of 14 px \(e.g. --image-size 224 112\)"):
        EncoderConfig(backbone="dinov2_vits14", image_size=(225, 112))
    with pytest.raises(ConfigError, match="multiples of 14"):
        EncoderConfig(backbone="dinov2_vits14_b5", image_size=(640, 480))  # the default size
    EncoderConfig(backbone="dinov2_vits14", image_size=(644, 364))
    EncoderConfig(backbone="vgg16", image_size=(225, 113))  # other backbones take any size
    with pytest.raises(ValueError, match="multiple of 14"), torch.no_grad():
        backbone(torch.zeros(1, 3, 112, 225))


def test_gardens_same_place_closer_than_different_place(backbone, gardens):
    from vpr_localizer.models.encoder import Encoder

    enc = Encoder(EncoderConfig(backbone="dinov2_vits14", image_size=(448, 252), aggregator="gem", pca_dim=0,
                                device="cpu"), backbone=backbone)
    (a0, a1), (b0, b1) = gardens[0], gardens[1]
    d = enc.encode_images([a0, a1, b0, b1])
    assert d.shape == (4, 384)
    np.testing.assert_allclose(np.linalg.norm(d, axis=1), 1.0, rtol=1e-5)
    sim = d @ d.T
    # same place (two day views) more similar than any cross-place pair
    assert min(sim[0, 1], sim[2, 3]) > max(sim[0, 2], sim[0, 3], sim[1, 2], sim[1, 3]), sim
    fp = enc.fingerprint()
    assert fp["backbone"] == "dinov2_vits14" and fp["local_dim"] == 384 and fp["image_size"] == [448, 252]
    assert fp["weights_sha256"] == "4a0019d288bcfb3d768a2ab427b4592e5491c9ee91388159c5e778083818c0b5"
