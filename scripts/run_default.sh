#!/usr/bin/env bash
# Set everything up and run the main job on the embedded default: full-size ControlNet canny2image
# on a sample image the project draws itself. Uses ./models/control_sd15_canny.pth when it exists,
# otherwise seeded random weights (the images are then noise, and every output says so).
# Extra arguments go to the `canny2image` command (see `.venv/bin/canny2image --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
args=("$@")
case " $* " in
  *" --ckpt"*|*" --random-weights "*|*" --tiny "*) ;;
  *) [ -f models/control_sd15_canny.pth ] || args+=(--random-weights) ;;
esac
exec .venv/bin/canny2image "${args[@]}"
