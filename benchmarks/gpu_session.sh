#!/usr/bin/env bash
# One GPU session of checks and measurements, as run on the device machine (H200) for the README:
#   1. the GPU tests (tests marked `gpu`: kernels at every real shape, fast mode graph == eager, ...)
#   2. bench_pipeline.py: reference, fast mode without fusions, full, the opt-in switches
#      (conv_gemm) and defaults switched off one at a time (CLIP in fp32, without geglu_gemm,
#      without ff_residual, without the fused DDIM update, the decode eager), side by side with the
#      previous commit's fast mode (PREV_TREE: an exported tree of that commit)
#   3. (SKIP_EXTRA=1 skips) kernels per step (by op and shape, every copy listed), the steady
#      peak (default, with the decode eager, low-VRAM), and fusion geglu_gemm's kernel against
#      cuBLAS + the GEGLU kernel with its tile sweep
# Usage: OUT=results_dir PREV_TREE=path PREV_COMMIT=sha bash benchmarks/gpu_session.sh
# Wheels the GPU machine lacks (omegaconf, open_clip_torch, ftfy, wcwidth) are installed from
# ./.whl when that folder exists.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:?set OUT}
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"

if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout "${TEST_TIMEOUT:-420}" python3 -m pytest -q -m gpu -p no:cacheprovider \
    tests/kernels tests/runtime tests/test_packaging.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
fi

python3 benchmarks/bench_pipeline.py --sizes 512 256 --batches 1 4 --repeats 5 --ref-repeats 2 \
  --warmup 1 --rows reference +cuda_graph +fusions +conv_gemm clip_fp32 no_geglu_gemm no_ff_residual \
  no_ddim_update no_decode_graph --out "$OUT" --tag "${TAG:-h200}" \
  2>&1 | tee "$OUT/bench.log" | grep -v " INFO " | tail -20
if [ -n "${PREV_TREE:-}" ]; then
  (cd "$PREV_TREE" && GIT_COMMIT=${PREV_COMMIT:-prev} python3 benchmarks/bench_pipeline.py \
    --sizes 512 256 --batches 1 4 --repeats 5 --warmup 1 --rows +fusions --no-eps-error \
    --out "$OUT" --tag "${TAG:-h200}_prev" 2>&1 | tee "$OUT/bench_prev.log" | grep -v " INFO " | tail -8)
fi
if [ "${SKIP_EXTRA:-0}" != 1 ]; then
  python3 benchmarks/profile_step.py --sizes 512 256 --by-shape 30 --out "$OUT" \
    --tag "${TAG:-h200}" 2>&1 | tee "$OUT/profile.log" | tail -6
  python3 benchmarks/steady_peak.py 2>&1 | tee "$OUT/steady_peak.log" | tail -12
  python3 benchmarks/steady_peak.py --no-decode-graph 2>&1 \
    | tee "$OUT/steady_peak_no_decode_graph.log" | tail -12
  python3 benchmarks/steady_peak.py --low-vram 2>&1 | tee "$OUT/steady_peak_low_vram.log" | tail -12
  python3 benchmarks/bench_kernels.py --only geglu_gemm --out "$OUT" 2>&1 | tail -8
fi
