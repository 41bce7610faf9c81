"""Shared fixtures: locate the real data in ``../shared`` (next to the repository root).

The data is never copied into the repository. When it is missing the tests that need it
fail (they do not skip) with a message naming the path that was looked for.
"""
from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        pytest.fail(f"{what} not found: expected directory {path} "
                    f"(the shared data lives in ../shared relative to the repo root {REPO_ROOT})",
                    pytrace=False)
    return path


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """``<repo>/../shared``."""
    return _require_dir(SHARED_DIR, "shared data directory")


@pytest.fixture(scope="session")
def datasets_dir(shared_dir: Path) -> Path:
    """``<repo>/../shared/datasets``."""
    return _require_dir(shared_dir / "datasets", "shared datasets directory")


@pytest.fixture(scope="session")
def weights_dir(shared_dir: Path) -> Path:
    """``<repo>/../shared/weights``."""
    return _require_dir(shared_dir / "weights", "shared weights directory")


def require_file(path: Path) -> Path:
    """Return ``path`` if it is a file, else fail the test with a message naming it."""
    if not Path(path).is_file():
        pytest.fail(f"required data file not found: {path}", pytrace=False)
    return Path(path)


@pytest.fixture(scope="session")
def data_file():
    """Callable ``data_file(path) -> path`` that fails the test when ``path`` is not a file."""
    return require_file


VGG_FILE = "vgg16_features_imagenet_caffe_bgr.pth"


@pytest.fixture(scope="session")
def vgg_path(weights_dir, data_file) -> Path:
    """``../shared/weights/vgg16_features_imagenet_caffe_bgr.pth`` (fails the test when missing)."""
    return data_file(weights_dir / VGG_FILE)


@pytest.fixture(scope="module")
def faiss_single_thread():
    """One faiss OpenMP thread for a test module: faiss's threads spin-wait and fight torch's for
    the 2 cores of the test machine (k-means of a few hundred points takes seconds); one faiss
    thread gives the same results. The previous setting is restored afterwards."""
    import faiss

    n = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(n)
