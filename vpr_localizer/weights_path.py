"""Where default weight files are looked for when no path is given.

Order: the folder named by the ``VPR_WEIGHTS_DIR`` environment variable, then the
``../shared/weights`` convention beside the repository (``<checkout>/../shared/weights``, i.e.
``Path(vpr_localizer.__file__).resolve().parents[2] / "shared" / "weights"``). Nothing else is
guessed; when neither holds the file the error lists both places.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Tuple

from vpr_localizer.errors import WeightsError

#: Environment variable naming a folder of weight files.
WEIGHTS_DIR_ENV = "VPR_WEIGHTS_DIR"


def shared_weights_dir() -> Path:
    """``../shared/weights`` beside the repository checkout that holds this package."""
    import vpr_localizer

    return Path(vpr_localizer.__file__).resolve().parents[2] / "shared" / "weights"


def weight_search_dirs() -> List[Tuple[Path, str]]:
    """``(folder, how it was chosen)`` in search order (``$VPR_WEIGHTS_DIR`` only when set)."""
    dirs = []
    env = os.environ.get(WEIGHTS_DIR_ENV, "").strip()
    if env:
        dirs.append((Path(env).expanduser(), f"${WEIGHTS_DIR_ENV}"))
    dirs.append((shared_weights_dir(), "../shared/weights beside the repository"))
    return dirs


def find_weight_file(file_name: str, what: str) -> str:
    """The first existing ``<folder>/<file_name>`` of :func:`weight_search_dirs`.

    Args:
        file_name: the conventional file name (e.g. ``vgg16_features_imagenet_caffe_bgr.pth``).
        what: what the weights are for (``"vgg16 backbone"``), used in the message.

    Returns:
        The file's path.

    Raises:
        WeightsError: not found; one line listing every place looked at.
    """
    looked = []
    for folder, how in weight_search_dirs():
        cand = folder / file_name
        if cand.is_file():
            return str(cand)
        looked.append(f"{cand} ({how})")
    if not os.environ.get(WEIGHTS_DIR_ENV, "").strip():
        looked.insert(0, f"${WEIGHTS_DIR_ENV} (not set)")
    raise WeightsError(f"no {what} weight file given and {file_name} not found; looked in: "
                       + "; ".join(looked) + f". Pass --weights FILE or set {WEIGHTS_DIR_ENV} to its folder")
