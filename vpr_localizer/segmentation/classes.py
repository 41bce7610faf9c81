"""Cityscapes semantics for place recognition (ROS-free): class table, palette, the
static/dynamic/sky/ignore simplification, per-pixel weights, colouring and the backend registry.

Label maps everywhere in the package are ``uint8 (H, W)`` arrays of Cityscapes **trainIds**:

====  ==============  ====  ==============
id    class           id    class
====  ==============  ====  ==============
0     road            10    sky
1     sidewalk        11    person
2     building        12    rider
3     wall            13    car
4     fence           14    truck
5     pole            15    bus
6     traffic light   16    train
7     traffic sign    17    motorcycle
8     vegetation      18    bicycle
9     terrain         19    background/ignore
====  ==============  ====  ==============

``255`` (the Cityscapes ground-truth "ignore" id) and any other value outside 0..18 are read as
ignore too. This matches the 20-output networks of ``../shared/weights`` (index 19 =
background/ignore).

Class simplification (RESEARCH.md section 5): localisation does not need 19 fine classes, only
what is *static structure* (worth describing a place by), what is a *dynamic object* (will not
be there next time: trainIds 11-18, person..bicycle), *sky* (10) and *ignore* (19/255: no label).
See :data:`COARSE_OF_TRAIN_ID` and :func:`static_weight`.

Backends (:class:`SegmentationBackend`, :func:`make_backend`): a callable ``rgb -> labels``.
``espnetv2`` (:mod:`.espnetv2`, Mehta et al. CVPR 2019) and ``espnet`` (:mod:`.espnet`, Mehta
et al. ECCV 2018) are our own implementations loading the Cityscapes weights of
``../shared/weights``; they reproduce the authors' reference label maps pixel for pixel.
``none`` does **no segmentation**: it labels every pixel 19 (ignore), which through
:func:`static_weight` (ignore weight 1.0) means "weight every pixel equally", i.e. the plain,
segmentation-free pipeline. ``panoptic_deeplab`` (:mod:`.panoptic`, Cheng et al. CVPR 2020) is
implemented and loads the official detectron2 Cityscapes checkpoint layout, but no such weights
exist here: its accuracy is unverified.
"""
from __future__ import annotations

import enum
from typing import Callable, Dict, Optional, Protocol, Tuple, runtime_checkable

import numpy as np

from vpr_localizer.errors import WeightsError

# --- class table -------------------------------------------------------------------------------

#: Number of real Cityscapes train classes (trainIds 0..18).
NUM_CLASSES = 19
#: trainId of background/ignore as output by the project's 20-class networks.
IGNORE_ID = 19
#: Cityscapes ground-truth ignore id; also read as ignore.
IGNORE_ID_GT = 255

#: trainId -> name, index 0..19 (19 = background/ignore), as in ``../shared/weights/README.md``.
TRAIN_ID_NAMES: Tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle", "background/ignore",
)

#: Official Cityscapes colours (cityscapesScripts ``helpers/labels.py``), RGB, for trainIds 0..18.
CITYSCAPES_COLORS: Tuple[Tuple[int, int, int], ...] = (
    (128, 64, 128),   # 0 road
    (244, 35, 232),   # 1 sidewalk
    (70, 70, 70),     # 2 building
    (102, 102, 156),  # 3 wall
    (190, 153, 153),  # 4 fence
    (153, 153, 153),  # 5 pole
    (250, 170, 30),   # 6 traffic light
    (220, 220, 0),    # 7 traffic sign
    (107, 142, 35),   # 8 vegetation
    (152, 251, 152),  # 9 terrain
    (70, 130, 180),   # 10 sky
    (220, 20, 60),    # 11 person
    (255, 0, 0),      # 12 rider
    (0, 0, 142),      # 13 car
    (0, 0, 70),       # 14 truck
    (0, 60, 100),     # 15 bus
    (0, 80, 100),     # 16 train
    (0, 0, 230),      # 17 motorcycle
    (119, 11, 32),    # 18 bicycle
)
#: Colour of ignore (19, 255, anything else): black, the colour of Cityscapes' "unlabeled".
IGNORE_COLOR: Tuple[int, int, int] = (0, 0, 0)

#: ``uint8 (256, 3)`` lookup table: label value -> RGB colour (ignore -> :data:`IGNORE_COLOR`).
PALETTE = np.zeros((256, 3), dtype=np.uint8)
PALETTE[:] = IGNORE_COLOR
PALETTE[:NUM_CLASSES] = np.asarray(CITYSCAPES_COLORS, dtype=np.uint8)
PALETTE.setflags(write=False)


class Coarse(enum.IntEnum):
    """The four coarse classes of the simplification (values used in coarse label maps)."""

    STATIC = 0   #: static structure: road..terrain except sky (trainIds 0-9)
    DYNAMIC = 1  #: movable objects: person, rider, car, truck, bus, train, motorcycle, bicycle (11-18)
    SKY = 2      #: sky (10)
    IGNORE = 3   #: no label: 19, 255 and any value outside 0..18


#: trainIds of dynamic (movable) classes.
DYNAMIC_TRAIN_IDS: Tuple[int, ...] = tuple(range(11, 19))
#: trainId of sky.
SKY_TRAIN_ID = 10
#: trainIds of static structure.
STATIC_TRAIN_IDS: Tuple[int, ...] = tuple(range(0, 10))

#: ``uint8 (256,)`` lookup table: label value -> :class:`Coarse` value.
COARSE_OF_TRAIN_ID = np.full(256, Coarse.IGNORE, dtype=np.uint8)
COARSE_OF_TRAIN_ID[list(STATIC_TRAIN_IDS)] = Coarse.STATIC
COARSE_OF_TRAIN_ID[list(DYNAMIC_TRAIN_IDS)] = Coarse.DYNAMIC
COARSE_OF_TRAIN_ID[SKY_TRAIN_ID] = Coarse.SKY
COARSE_OF_TRAIN_ID.setflags(write=False)


def coarse_class(train_id: int) -> Coarse:
    """Coarse class of one trainId (values outside 0..18, including 19 and 255, are ignore)."""
    t = int(train_id)
    return Coarse(int(COARSE_OF_TRAIN_ID[t])) if 0 <= t <= 255 else Coarse.IGNORE


def _as_label_index(labels: np.ndarray) -> np.ndarray:
    """Validate a label map and return it as ``uint8 (H, W)`` (out-of-range values -> 255)."""
    if not isinstance(labels, np.ndarray):
        raise ValueError(f"labels must be a numpy array (H, W) of trainIds, got {type(labels).__name__}")
    if labels.ndim != 2:
        raise ValueError(f"labels must have shape (H, W), got {labels.shape}")
    if labels.dtype == np.uint8:
        return labels
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must have an integer dtype (uint8 trainIds), got {labels.dtype}")
    return np.where((labels >= 0) & (labels <= 255), labels, IGNORE_ID_GT).astype(np.uint8)


def coarse_labels(labels: np.ndarray) -> np.ndarray:
    """Map a trainId label map to coarse classes.

    Args:
        labels: ``(H, W)`` integer trainIds (uint8 expected).

    Returns:
        ``uint8 (H, W)`` of :class:`Coarse` values (0 static, 1 dynamic, 2 sky, 3 ignore).

    Raises:
        ValueError: not a 2-D integer array.
    """
    return COARSE_OF_TRAIN_ID[_as_label_index(labels)]


def coarse_fractions(labels: np.ndarray) -> Dict[str, float]:
    """Fraction of pixels in each coarse class: ``{"static": f, "dynamic": f, "sky": f, "ignore": f}``
    (sums to 1; all 0.0 for an empty map)."""
    counts = np.bincount(coarse_labels(labels).ravel(), minlength=len(Coarse)).astype(np.float64)
    total = float(counts.sum())
    return {c.name.lower(): (float(counts[c]) / total if total else 0.0) for c in Coarse}


#: Default weight of sky pixels in :func:`static_weight` (see there for why it is 0).
DEFAULT_SKY_WEIGHT = 0.0


def static_weight(labels: np.ndarray, dynamic_weight: float = 0.0, sky_weight: float = DEFAULT_SKY_WEIGHT,
                  ignore_weight: float = 1.0) -> np.ndarray:
    """Per-pixel weight for "describe the place by its static structure".

    Static structure (trainIds 0-9) always weighs 1.0; dynamic objects (11-18), sky (10) and
    ignore (19, 255, anything outside 0..18) weigh ``dynamic_weight``, ``sky_weight`` and
    ``ignore_weight``.

    Defaults and why:

    * ``dynamic_weight = 0.0``: cars and people will not be there when the place is revisited
      (the point of the method, RESEARCH.md section 1).
    * ``sky_weight = 0.0``: sky pixels carry the *condition* (daylight blue, overcast grey,
      black at night, clouds, sun glare), not the place, and day-vs-night is exactly the case
      this project targets. The skyline itself is not lost: it is the edge of buildings and
      vegetation, which keep weight 1, and their CNN features (conv5_3 receptive field
      ~200 px) see the contour. Set it to e.g. 0.5 to keep a little of the sky's layout.
    * ``ignore_weight = 1.0``: "no label" is not evidence of a moving object, so unlabelled
      pixels keep full weight. In particular the ``none`` backend (every pixel ignore) gives a
      uniform weight of 1, i.e. exactly the segmentation-free pipeline.

    Note: a frame that is entirely dynamic/sky gets an all-zero map with the defaults; callers
    that normalise by the weight sum must handle that (e.g. fall back to uniform weights).

    Args:
        labels: ``(H, W)`` integer trainIds (uint8 expected).
        dynamic_weight, sky_weight, ignore_weight: finite, ``>= 0``.

    Returns:
        ``float32 (H, W)`` weights.

    Raises:
        ValueError: bad label array, or a weight that is negative or not finite.
    """
    weights = {"dynamic_weight": dynamic_weight, "sky_weight": sky_weight, "ignore_weight": ignore_weight}
    for name, w in weights.items():
        if not np.isfinite(float(w)) or float(w) < 0:
            raise ValueError(f"{name} must be finite and >= 0, got {w}")
    lut = np.empty(len(Coarse), dtype=np.float32)
    lut[Coarse.STATIC] = 1.0
    lut[Coarse.DYNAMIC] = dynamic_weight
    lut[Coarse.SKY] = sky_weight
    lut[Coarse.IGNORE] = ignore_weight
    return lut[coarse_labels(labels)]


# --- colouring ---------------------------------------------------------------------------------

def colorize(labels: np.ndarray) -> np.ndarray:
    """Colour a label map with the official Cityscapes palette.

    Args:
        labels: ``(H, W)`` integer trainIds (uint8 expected).

    Returns:
        ``uint8 (H, W, 3)`` RGB; ignore (19, 255, anything outside 0..18) is black.

    Raises:
        ValueError: not a 2-D integer array.
    """
    return PALETTE[_as_label_index(labels)]


def overlay(rgb: np.ndarray, labels: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend the label colours over the camera image (for RViz).

    Labelled pixels (trainIds 0..18) become ``round((1 - alpha) * rgb + alpha * colour)``
    (rounded half to even, in float32); ignore pixels (19, 255, anything else) keep the camera
    pixel unchanged, so "no label" never darkens the image and the ``none`` backend's overlay
    is the camera image itself.

    Args:
        rgb: ``uint8 (H, W, 3)`` RGB camera image.
        labels: ``(H, W)`` integer trainIds of the same size.
        alpha: colour opacity in ``[0, 1]``.

    Returns:
        A new ``uint8 (H, W, 3)`` RGB array.

    Raises:
        ValueError: bad arrays, sizes that differ, or ``alpha`` outside ``[0, 1]``.
    """
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"rgb must be a uint8 (H, W, 3) array, got {getattr(rgb, 'dtype', type(rgb).__name__)} "
                         f"{getattr(rgb, 'shape', '')}")
    idx = _as_label_index(labels)
    if idx.shape != rgb.shape[:2]:
        raise ValueError(f"labels {idx.shape} and image {rgb.shape[:2]} differ in size")
    a = float(alpha)
    if not 0.0 <= a <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    blend = np.rint(rgb.astype(np.float32) * np.float32(1.0 - a) + PALETTE[idx].astype(np.float32) * np.float32(a))
    out = np.clip(blend, 0, 255).astype(np.uint8)
    ignore = COARSE_OF_TRAIN_ID[idx] == Coarse.IGNORE
    out[ignore] = rgb[ignore]
    return out


# --- backends ----------------------------------------------------------------------------------

@runtime_checkable
class SegmentationBackend(Protocol):
    """What a segmentation backend is.

    Attributes:
        name: registry name (``none``, ``espnetv2`` ...).

    ``backend(rgb)`` takes a ``uint8 (H, W, 3)`` RGB image and returns ``uint8 (H, W)``
    Cityscapes trainIds (0..18, 19 = background/ignore) of the same ``H, W`` (a backend that
    runs at another resolution resizes its output back, nearest neighbour). It raises
    :class:`~vpr_localizer.errors.ImageLoadError` or ``ValueError`` for an invalid image.
    """

    name: str

    def __call__(self, rgb: np.ndarray) -> np.ndarray: ...


def backend_input_size(backend: str, input_size, minimum: int = 16) -> Tuple[int, int]:
    """Validate a segmentation backend's network input ``(width, height)`` in pixels.

    Raises:
        WeightsError: not two integers, or smaller than ``minimum`` x ``minimum``.
    """
    try:
        w, h = (int(v) for v in input_size)
    except (TypeError, ValueError) as exc:
        raise WeightsError(f"{backend} input_size must be (width, height), got {input_size!r}") from exc
    if w < minimum or h < minimum:
        raise WeightsError(f"{backend} input_size must be at least {minimum}x{minimum}, got {w}x{h}")
    return w, h


def check_rgb(rgb: np.ndarray) -> None:
    """Raise ValueError unless ``rgb`` is a non-empty ``uint8 (H, W, 3)`` array (backend input)."""
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected a uint8 (H, W, 3) RGB image, got {getattr(rgb, 'dtype', type(rgb).__name__)} "
                         f"{getattr(rgb, 'shape', '')}")
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ValueError(f"expected an RGB image with H, W > 0, got {rgb.shape}")


class NoSegmentation:
    """Backend ``none``: no segmentation at all: every pixel is labelled 19 (ignore).

    It exists so the node graph (and its topic interface) runs before a real network is
    available. Its labels carry no information; with :func:`static_weight` they give uniform
    weights, i.e. the plain pipeline.
    """

    name = "none"

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        """``uint8 (H, W, 3)`` -> ``uint8 (H, W)`` filled with 19."""
        check_rgb(rgb)
        return np.full(rgb.shape[:2], IGNORE_ID, dtype=np.uint8)

    def __repr__(self) -> str:
        return "NoSegmentation()"


def _make_none(weights: Optional[str] = None, device: str = "auto", **_ignored) -> NoSegmentation:
    return NoSegmentation()


def _make_espnetv2(weights: Optional[str] = None, device: str = "auto",
                   input_size: Tuple[int, int] = (1024, 512), **_ignored) -> SegmentationBackend:
    """Backend ``espnetv2``: ESPNetv2 s=2.0 Cityscapes (Mehta et al., CVPR 2019)."""
    from vpr_localizer.segmentation.espnetv2 import ESPNetv2Backend  # lazy: keeps torch out of ``import semantics``

    if not weights:
        raise WeightsError("segmentation backend espnetv2 needs weights=..., e.g. "
                           "../shared/weights/espnetv2_s_2.0_city_1024x512.pth")
    return ESPNetv2Backend(weights, device=device, input_size=tuple(input_size))


def _make_espnet(weights: Optional[str] = None, device: str = "auto", **kwargs) -> SegmentationBackend:
    """Backend ``espnet``: ESPNet p=2 q=8 Cityscapes (Mehta et al., ECCV 2018); weights e.g.
    ../shared/weights/espnet_p2_q8_city_decoder.pth (or ..._encoder.pth with decoder=False)."""
    from vpr_localizer.segmentation.espnet import make_espnet_backend  # lazy: keeps torch out of ``import semantics``

    return make_espnet_backend(weights=weights, device=device, **kwargs)


def _make_panoptic_deeplab(weights: Optional[str] = None, device: str = "auto",
                           input_size: Tuple[int, int] = (1024, 512), **_ignored) -> SegmentationBackend:
    """Backend ``panoptic_deeplab``: Panoptic-DeepLab R-52 Cityscapes (Cheng et al., CVPR 2020);
    accuracy unverified, no weights ship with the project."""
    from vpr_localizer.segmentation.panoptic import PanopticDeepLabBackend  # lazy: keeps torch out of ``import semantics``

    if not weights:
        raise WeightsError("segmentation backend panoptic_deeplab needs weights=... (a detectron2 "
                           "Panoptic-DeepLab Cityscapes checkpoint, e.g. model_final_380d9c.pkl); "
                           "none ships with this project")
    return PanopticDeepLabBackend(weights, device=device, input_size=tuple(input_size))


_REGISTRY: Dict[str, Callable[..., SegmentationBackend]] = {
    "none": _make_none,
    "espnetv2": _make_espnetv2,
    "espnet": _make_espnet,
    "panoptic_deeplab": _make_panoptic_deeplab,
}


def backend_names() -> Tuple[str, ...]:
    """Every registered backend name (implemented or not)."""
    return tuple(_REGISTRY)


def register_backend(name: str, factory: Callable[..., SegmentationBackend]) -> None:
    """Register (or replace) a backend factory ``factory(weights=..., device=..., **kw) -> backend``."""
    _REGISTRY[str(name).strip().lower()] = factory


def make_backend(name: str, **kwargs) -> SegmentationBackend:
    """Build a segmentation backend by name.

    Args:
        name: ``none`` (no segmentation: every pixel ignore), ``espnetv2``, ``espnet`` or
            ``panoptic_deeplab`` (case-insensitive).
        **kwargs: backend options, e.g. ``weights`` (path) and ``device`` (``auto``, ``cpu``,
            ``cuda``); ``none`` ignores them.

    Returns:
        A :class:`SegmentationBackend`.

    Raises:
        WeightsError: unknown name (the message lists the known ones), or a backend that is
            not implemented yet / cannot load its weights (the message names the backend).
    """
    key = str(name).strip().lower()
    if key not in _REGISTRY:
        raise WeightsError(f"unknown segmentation backend {name!r}; known: {', '.join(_REGISTRY)}")
    return _REGISTRY[key](**kwargs)
