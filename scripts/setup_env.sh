#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install everything into it.
#   VENV=.venv (default)  python3 -m venv; torch + torchvision (PyPI CUDA build, runs on CPU too),
#   faiss-cpu, the ROS 2 Kilted wheels, and this package in editable mode.
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating virtual environment $VENV"
    "$PY" -m venv "$VENV"
fi
# The machine image's pip configuration points at a folder holding a CPU-only torch wheel, for
# which no torchvision exists (torchvision then fails to import). Ignore pip configuration files
# and that folder so torch/torchvision both come from the package index.
export PIP_CONFIG_FILE=/dev/null
export PIP_FIND_LINKS=""
export PIP_DISABLE_PIP_VERSION_CHECK=1
if "$VENV/bin/python" -c "import torch, sys; sys.exit(0 if torch.__version__.endswith('+cpu') else 1)" 2>/dev/null; then
    echo "[setup] replacing the CPU-only torch wheel (no matching torchvision) by the PyPI build"
    "$VENV/bin/python" -m pip uninstall -y -q torch torchvision
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
echo "[setup] installing requirements (torch CUDA build is large the first time)"
"$VENV/bin/python" -m pip install -q -r requirements.txt -r requirements-ros.txt
"$VENV/bin/python" -m pip install -q -e . --no-deps
"$VENV/bin/python" - <<'PY'
import torch, torchvision, faiss, rclpy  # noqa: F401  (fail here, not in the tests, if an install is broken)
print(f"[setup] torch {torch.__version__} (cuda available: {torch.cuda.is_available()}), "
      f"torchvision {torchvision.__version__}, faiss {faiss.__version__}, rclpy OK")
PY
