#!/usr/bin/env bash
# Set everything up and run the test suite on CPU (Triton kernels run in the interpreter).
# Installs: the venv with test extras, and Debian's chromium for the browser test.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "note: the browser test needs Debian's chromium: sudo apt-get install -y chromium" >&2
  fi
fi
EXTRAS=test bash scripts/setup_env.sh
export GRADIO_ANALYTICS_ENABLED=False HF_HUB_OFFLINE=1
exec .venv/bin/python -m pytest -q "$@"
