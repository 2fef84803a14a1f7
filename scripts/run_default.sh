#!/usr/bin/env bash
# Set everything up and run the main job on the embedded default: full-size ControlNet canny2image
# on a sample image the project draws itself, with seeded random weights unless
# ./models/control_sd15_canny.pth exists. Extra arguments go to the `canny2image` command.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/canny2image "$@"
