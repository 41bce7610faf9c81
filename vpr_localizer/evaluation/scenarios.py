"""The project's main job on real data: named evaluation scenarios over ``../shared/datasets``.

Each scenario says which images form the map and which the queries, how correctness is
judged, and the network input size. ``vpr-localizer evaluate --scenario NAME`` runs one;
``vpr-localizer demo`` runs them all and prints the results table of the README.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from vpr_localizer.errors import DatasetError
from vpr_localizer.evaluation.evaluate import GroundTruth
from vpr_localizer.io.records import ImageRecord, load_records, select, records_from_csv

VGG16_WEIGHTS = "weights/vgg16_features_imagenet_caffe_bgr.pth"
#: Segmentation backend (and its weights, relative to the shared folder) that guided encoders
#: (static mask / segmentation stream) use in the scenarios unless told otherwise.
SEGMENTATION_BACKEND = "espnetv2"
SEGMENTATION_WEIGHTS = "weights/espnetv2_s_2.0_city_1024x512.pth"


@dataclass(frozen=True)
class ImageSetSpec:
    """Where a set of images comes from, relative to the datasets folder."""

    folder: str
    csv: Optional[str] = None
    gps: str = "auto"
    parity: str = "all"
    sequence: Tuple[str, ...] = ()
    condition: Tuple[str, ...] = ()
    index_range: Optional[Tuple[int, int]] = None
    index_step: int = 1

    def load(self, datasets_dir: str) -> List[ImageRecord]:
        folder = os.path.join(datasets_dir, self.folder)
        if not os.path.isdir(folder):
            raise DatasetError(f"dataset folder not found: {folder} (see ../shared/datasets/README.md)")
        if self.csv:
            recs = records_from_csv(os.path.join(datasets_dir, self.csv), folder)
            recs = select(recs, self.parity, self.condition or None, self.sequence or None)
        else:
            recs = load_records(folder, None, self.gps, self.parity, self.condition or None)
        if self.index_range is not None:  # a part of the route: positions in frame order
            recs = sorted(recs, key=lambda r: (r.frame is None, r.frame, r.name))
            recs = recs[self.index_range[0]:self.index_range[1]:self.index_step]
        if not recs:
            raise DatasetError(f"scenario image set {self} is empty")
        return recs


@dataclass(frozen=True)
class Scenario:
    """One evaluation setting: map images, query images, ground truth, input size."""

    name: str
    description: str
    map: ImageSetSpec
    queries: ImageSetSpec
    gt: GroundTruth
    image_size: Tuple[int, int]
    segmentation_size: Tuple[int, int] = (512, 256)


#: Nordland route positions (0-based, frame order) for training and for the held-out evaluation:
#: disjoint, with 100 positions (about 17 min of travel) between them.
NORDLAND_TRAIN = (0, 2500)
NORDLAND_HELDOUT = (2600, 3576)
_GP = "gardens_point_mini"
_GP_CSV = "gardens_point_mini/manifest.csv"

SCENARIOS: Dict[str, Scenario] = {s.name: s for s in [
    Scenario("gardens_day_vs_night",
             "Gardens Point: day queries against a night-only map (the seed paper's setting)",
             ImageSetSpec(_GP, _GP_CSV, sequence=("gardens_point",), condition=("night",)),
             ImageSetSpec(_GP, _GP_CSV, sequence=("gardens_point",), condition=("day",)),
             GroundTruth("place"), (640, 360)),
    Scenario("gardens_night_vs_day",
             "Gardens Point: night queries against a day map",
             ImageSetSpec(_GP, _GP_CSV, sequence=("gardens_point",), condition=("day",)),
             ImageSetSpec(_GP, _GP_CSV, sequence=("gardens_point",), condition=("night",)),
             GroundTruth("place"), (640, 360)),
    Scenario("trail_snow_vs_dry",
             "Forest trail: snow queries against a dry map",
             ImageSetSpec(_GP, _GP_CSV, sequence=("trail",), condition=("dry",)),
             ImageSetSpec(_GP, _GP_CSV, sequence=("trail",), condition=("snow",)),
             GroundTruth("place"), (640, 408)),
    Scenario("trail_dry_vs_snow",
             "Forest trail: dry queries against a snow map",
             ImageSetSpec(_GP, _GP_CSV, sequence=("trail",), condition=("snow",)),
             ImageSetSpec(_GP, _GP_CSV, sequence=("trail",), condition=("dry",)),
             GroundTruth("place"), (640, 408)),
    Scenario("nordland_winter_vs_summer",
             "Nordland: all 3,576 winter frames against the 3,576 summer frames, +-1 frame; "
             "64x32 thumbnails upscaled 2x to 128x64",
             ImageSetSpec("nordland_thumbs/summer", gps="none"),
             ImageSetSpec("nordland_thumbs/winter", gps="none"),
             GroundTruth("frame", frame_tolerance=1), (128, 64)),
    Scenario("nordland_heldout_winter_vs_summer",
             "Nordland, held-out part of the route (positions 2600-3575, never used by training): "
             "976 winter frames against the 976 summer frames, +-1 frame; 128x64",
             ImageSetSpec("nordland_thumbs/summer", gps="none", index_range=NORDLAND_HELDOUT),
             ImageSetSpec("nordland_thumbs/winter", gps="none", index_range=NORDLAND_HELDOUT),
             GroundTruth("frame", frame_tolerance=1), (128, 64), segmentation_size=(256, 128)),
    Scenario("lund_odd_vs_even",
             "Lund: even frames (EXIF GPS) as the map, odd frames as queries; error in metres",
             ImageSetSpec("lund_gps", gps="exif", parity="even"),
             ImageSetSpec("lund_gps", gps="exif", parity="odd"),
             GroundTruth("position", thresholds_m=(25.0, 3.0)), (640, 480)),
]}


def get_scenario(name: str) -> Scenario:
    """Look up a scenario by name.

    Raises:
        DatasetError: unknown name (the message lists the known ones).
    """
    if name not in SCENARIOS:
        raise DatasetError(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}")
    return SCENARIOS[name]


@dataclass(frozen=True)
class TrainingSet:
    """Traversals of one route for ``vpr-localizer train`` (the first is the reference)."""

    name: str
    description: str
    traversals: Tuple[ImageSetSpec, ...]
    gt: str
    image_size: Tuple[int, int]
    segmentation_size: Tuple[int, int]
    d_pos: float
    d_neg: float


TRAINING_SETS: Dict[str, TrainingSet] = {t.name: t for t in [
    TrainingSet("nordland_train",
                "Nordland summer + winter, route positions 0-2499 (every position), 100 positions before "
                "nordland_heldout_winter_vs_summer (2600-3575); 128x64",
                (ImageSetSpec("nordland_thumbs/summer", gps="none", index_range=NORDLAND_TRAIN),
                 ImageSetSpec("nordland_thumbs/winter", gps="none", index_range=NORDLAND_TRAIN)),
                "frame", (128, 64), (256, 128), d_pos=1.0, d_neg=10.0),
]}


def get_training_set(name: str) -> TrainingSet:
    """Look up a training set by name.

    Raises:
        DatasetError: unknown name (the message lists the known ones).
    """
    if name not in TRAINING_SETS:
        raise DatasetError(f"unknown training set {name!r}; known: {', '.join(TRAINING_SETS)}")
    return TRAINING_SETS[name]
