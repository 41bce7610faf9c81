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
