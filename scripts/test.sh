#!/usr/bin/env bash
# Install from scratch into .venv (see setup_env.sh) and run the whole test suite.
# Needs ../shared (datasets + weights) beside the repository.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
exec .venv/bin/python -m pytest -ra "$@"
