"""DINOv2 ViT-S/14 as a dense-feature backbone, AnyLoc-style.

DINOv2 (Oquab et al., "DINOv2: Learning Robust Visual Features without Supervision", TMLR 2024,
arXiv 2304.07193, 2023) is a self-supervised Vision Transformer. AnyLoc (Keetha et al.,
"AnyLoc: Towards Universal Visual Place Recognition", RA-L 2023) showed that the dense *patch
tokens of an intermediate block* of such a ViT, aggregated without any VPR training (VLAD on a
k-means vocabulary, or GeM), are strong place descriptors across conditions. This module gives
the encoder exactly that: the patch tokens after transformer block ``N`` reshaped into a
``(B, 384, H / 14, W / 14)`` feature map, so the project's aggregators (NetVLAD initialised by
k-means = AnyLoc's VLAD, GeM, GAP) work on it unchanged.

* Architecture: ``timm``'s ``vit_small_patch14_dinov2`` (12 blocks, width 384, 6 heads,
  layer-scale, no register tokens, patch 14 px), built with ``pretrained=False`` (nothing is
  downloaded) and ``dynamic_img_size=True``: the position embedding, stored for a 37 x 37 grid
  (518 px), is resampled bicubically to the input's ``H / 14 x W / 14`` grid.
* Weights: the official DINOv2 key names (``dinov2_vits14_pretrain.pth``), e.g.
  ``../shared/weights/dinov2_vits14_imgfocus.pth``, loaded *strictly*; the only tensor ignored
  is ``mask_token`` (used by DINOv2's masked-image training, never at inference).
* Block numbering: 0-based index into the 12 transformer blocks (as ``timm``'s
  ``forward_intermediates`` and AnyLoc's layer hooks count); block 11 is the last. Tokens are
  taken straight out of the block (AnyLoc's "token" facet), without the final LayerNorm. Blocks
  after ``N`` are dropped from the module, so they cost nothing.
* Input: ``float32 (B, 3, H, W)``, RGB / 255 normalised with the ImageNet mean / std (the
  ``torchvision`` preprocessing of :mod:`vpr_localizer.models.backbones`); ``H`` and ``W``
  must be multiples of 14 pixels (:data:`PATCH_SIZE`).
"""
from __future__ import annotations

from typing import Dict, List

import torch
from torch import nn

from vpr_localizer.errors import WeightsError

#: Side of one ViT patch = output stride, pixels.
PATCH_SIZE = 14
#: Token (local-feature) dimension of ViT-S.
EMBED_DIM = 384
#: Number of transformer blocks of ViT-S/14.
DEPTH = 12
#: The block the plain ``dinov2_vits14`` backbone name stands for (0-based). Chosen by
#: ``benchmarks/sweep_dinov2_blocks.py`` on the Nordland training part (route positions
#: 0-2499 only): see the README, "DINOv2 ViT-S/14 backbone". A registered name never changes
#: meaning; another block is another name (``dinov2_vits14_b<N>``).
DEFAULT_BLOCK = 8
#: Conventional weight file name, looked up in ``$VPR_WEIGHTS_DIR`` / ``../shared/weights``.
WEIGHT_FILE = "dinov2_vits14_imgfocus.pth"
#: The only tensor of a DINOv2 checkpoint that is not used at inference.
IGNORED_KEYS = ("mask_token",)
TIMM_MODEL = "vit_small_patch14_dinov2"
REFERENCE = ("DINOv2 ViT-S/14, Oquab et al. 2023 (arXiv 2304.07193); dense patch tokens of an "
             "intermediate block as in AnyLoc, Keetha et al., RA-L 2023")


class DinoV2PatchTokens(nn.Module):
    """Patch tokens of one DINOv2 block as a feature map.

    Args:
        vit: a ``timm`` ``VisionTransformer`` with the DINOv2 weights loaded (modified in
            place: the blocks after ``block``, the final norm and the head are removed).
        block: 0-based block whose output tokens are returned (0 .. ``len(vit.blocks) - 1``).
    """

    def __init__(self, vit: nn.Module, block: int):
        super().__init__()
        if not 0 <= block < len(vit.blocks):
            raise ValueError(f"block must be 0..{len(vit.blocks) - 1}, got {block}")
        vit.blocks = vit.blocks[:block + 1]
        vit.norm = nn.Identity()
        vit.fc_norm = nn.Identity()
        vit.head = nn.Identity()
        self.vit = vit
        self.block = int(block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``float32 (B, 3, H, W)`` preprocessed -> ``float32 (B, 384, H / 14, W / 14)``.

        Raises:
            ValueError: ``H`` or ``W`` is not a multiple of 14 pixels.
        """
        b, _, h_px, w_px = x.shape
        if h_px % PATCH_SIZE or w_px % PATCH_SIZE:
            raise ValueError(f"DINOv2 input must be a multiple of {PATCH_SIZE} px on each side, "
                             f"got {w_px} x {h_px} (W x H)")
        h, w = h_px // PATCH_SIZE, w_px // PATCH_SIZE
        vit = self.vit
        t = vit.patch_embed(x)          # (B, h, w, C) with dynamic_img_size
        t = vit._pos_embed(t)           # (B, 1 + h*w, C): CLS prepended, position embedding resampled to h x w
        t = vit.norm_pre(vit.patch_drop(t))
        t = vit.blocks(t)
        t = t[:, vit.num_prefix_tokens:]  # drop CLS
        return t.reshape(b, h, w, t.shape[-1]).permute(0, 3, 1, 2).contiguous()


def _describe(keys: List[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (f" ... (+{len(keys) - n})" if len(keys) > n else "")


def build_dinov2_vits14_body(sd: Dict[str, torch.Tensor], path: str, block: int = DEFAULT_BLOCK) -> nn.Module:
    """DINOv2 ViT-S/14 up to ``block``, weights loaded strictly from ``sd``.

    Args:
        sd: state dict with the official DINOv2 key names (``cls_token``, ``pos_embed``
            ``(1, 1 + 37*37, 384)``, ``patch_embed.proj.*``, ``blocks.<i>.*``, ``norm.*``; an
            extra ``mask_token`` is ignored). Tensors are copied into float32 parameters.
        path: where ``sd`` came from (for messages).
        block: 0-based block whose patch tokens the module returns.

    Returns:
        :class:`DinoV2PatchTokens`: ``(B, 3, H, W)`` -> ``(B, 384, H / 14, W / 14)`` float32.

    Raises:
        WeightsError: ``timm`` is missing, or a tensor is missing, unexpected or of the wrong
            shape (the message lists the first few of each).
    """
    try:
        import timm
    except ImportError as exc:  # pragma: no cover - install problem
        raise WeightsError("the DINOv2 backbone needs the 'timm' package (pip install timm)") from exc
    vit = timm.create_model(TIMM_MODEL, pretrained=False, num_classes=0, dynamic_img_size=True)
    expected = vit.state_dict()
    sd = {k: v for k, v in sd.items() if k not in IGNORED_KEYS}
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [f"{k} {tuple(sd[k].shape)} (expected {tuple(v.shape)})" for k, v in expected.items()
             if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    if missing or unexpected or wrong:
        parts = [f"{len(missing)} missing: {_describe(missing)}" if missing else "",
                 f"{len(unexpected)} unexpected: {_describe(unexpected)}" if unexpected else "",
                 f"{len(wrong)} of the wrong shape: {_describe(wrong)}" if wrong else ""]
        raise WeightsError(f"{path}: not a DINOv2 ViT-S/14 state dict ({TIMM_MODEL}, official key names); "
                           + "; ".join(p for p in parts if p))
    try:
        vit.load_state_dict(sd, strict=True)
    except RuntimeError as exc:  # e.g. a tensor that cannot be copied (dtype)
        raise WeightsError(f"{path}: does not load into DINOv2 ViT-S/14: {exc}") from exc
    return DinoV2PatchTokens(vit, block).eval()
