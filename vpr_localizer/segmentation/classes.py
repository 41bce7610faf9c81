"""Cityscapes classes for place recognition (ROS-free, no torch): class table, palette, the
static/dynamic/sky/ignore simplification, per-pixel weights and colouring.

Label maps everywhere in the package are ``uint8 (H, W)`` arrays of Cityscapes **trainIds**
(M. Cordts et al., "The Cityscapes Dataset for Semantic Urban Scene Understanding", CVPR 2016;
trainIds and colours as in the dataset's ``cityscapesScripts/helpers/labels.py``):

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
ignore too. Index 19 = background/ignore is the 20th output of the ESPNet (Mehta et al., ECCV
2018) and ESPNetv2 (Mehta et al., CVPR 2019) Cityscapes networks.

Class simplification: localisation does not need 19 fine classes, only what is *static
structure* (worth describing a place by), what is a *dynamic object* (will not be there next
time: trainIds 11-18, person..bicycle), *sky* (10) and *ignore* (19/255: no label). See
:data:`COARSE_OF_TRAIN_ID`, :func:`static_weight` and, for how the weights enter the
descriptor, :mod:`vpr_localizer.models.guided`.

The backends that produce such label maps are in :mod:`vpr_localizer.segmentation.registry`
(:func:`~vpr_localizer.segmentation.registry.make_backend`) and
:mod:`vpr_localizer.segmentation.base`.
"""
from __future__ import annotations

import enum
from typing import Dict, Tuple

import numpy as np

from vpr_localizer.io.image_files import validate_rgb

# --- class table -------------------------------------------------------------------------------

#: Number of real Cityscapes train classes (trainIds 0..18).
NUM_CLASSES = 19
#: trainId of background/ignore as output by the project's 20-class networks.
IGNORE_ID = 19
#: Cityscapes ground-truth ignore id; also read as ignore.
IGNORE_ID_GT = 255

#: trainId -> name, index 0..19 (19 = background/ignore: the networks' 20th output).
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
      (the point of the method).
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
        ImageLoadError: ``rgb`` is not a non-empty ``uint8 (H, W, 3)`` array (the package's one
            RGB check, :func:`~vpr_localizer.io.image_files.validate_rgb`).
        ValueError: a bad label array, sizes that differ, or ``alpha`` outside ``[0, 1]``.
    """
    validate_rgb(rgb)
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
