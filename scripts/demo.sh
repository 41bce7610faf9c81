#!/usr/bin/env bash
# Install (see setup_env.sh) and run the main job: every real-data scenario, then the results table.
# Extra arguments go to `vpr-localizer demo` (e.g. --scenarios lund_odd_vs_even).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# the ROS part of the demo runs every node in this process: keep DDS discovery on this machine
export ROS_AUTOMATIC_DISCOVERY_RANGE="${ROS_AUTOMATIC_DISCOVERY_RANGE:-LOCALHOST}"
exec .venv/bin/vpr-localizer demo "$@"
