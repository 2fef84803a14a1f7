#!/usr/bin/env bash
# Set everything up and run the main job on the embedded default: full-size ControlNet canny2image
# on a sample image the project draws itself. Uses the default checkpoint when there is one
# (./models/control_sd15_canny.pth or .safetensors: runtime.app.find_checkpoint, the command's own
# rule), otherwise seeded random weights (the images are then noise, and every output says so).
# Extra arguments go to the `canny2image` command (see `.venv/bin/canny2image --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
args=("$@")
case " $* " in
  *" --ckpt"*|*" --random-weights "*|*" --tiny "*) ;;
  *) ckpt=$(.venv/bin/python -c \
       'from runtime.app import find_checkpoint; print(find_checkpoint() or "")')
     [ -n "$ckpt" ] || args+=(--random-weights) ;;
esac
exec .venv/bin/canny2image "${args[@]}"
