#!/usr/bin/env bash
# Create (or reuse) ./.venv with everything the project needs. Idempotent; safe to re-run.
#   EXTRAS=test   also install the test-only references (diffusers, transformers, pytest, ...)
#   TORCH_SPEC    override the torch/torchvision pair, e.g. for ROCm wheels you installed yourself:
#                 TORCH_SPEC=skip keeps whatever torch the venv already has.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
# torch and torchvision must be a matching pair (a mismatched torchvision breaks every import of
# open_clip, transformers' models and lightning). 2.14.1/0.29.1 is the pair CI is pinned to.
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
if [ "$TORCH_SPEC" != "skip" ]; then
  if ! .venv/bin/python - <<'PY' 2>/dev/null
import torch, torchvision  # noqa: F401  (fails on a mismatched pair)
PY
  then
    "${PIP[@]}" $TORCH_SPEC
  fi
fi
"${PIP[@]}" -r requirements.txt
if [ "${EXTRAS:-}" = "test" ]; then
  "${PIP[@]}" -r requirements-test.txt
fi
"${PIP[@]}" --no-deps --no-build-isolation -e .
