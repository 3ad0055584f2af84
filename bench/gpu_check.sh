#!/usr/bin/env bash
# GPU tests and the GPU benchmark in one go, for a lent CUDA machine whose image has PyTorch but not
# the project's other dependencies.  Prepare here (README "Benchmarks", GPU): the wheels of those
# dependencies for the machine's Python in .whl/ and a copy of ../shared/data/slides under
# .gpudata/shared/data/; then run this there with both carried.  Logs go to $OUT (default gpu-out/).
# SKIP_GPU_TESTS=1, SKIP_BENCH=1, SKIP_RUN_TESTS=1 leave a step out; GPU_TESTS_S, BENCH_S, RUN_TESTS_S limit each.
# All three take ~8 minutes on an H200 machine (tests/test_run.py alone ~3.5: each test's LocalCluster starts
# CUDA workers there), near a lent machine's 10-minute call limit: split them over two calls if in doubt.
# Run pytest there through this script (or with PYTHONUNBUFFERED=1 and tee to $OUT): a pytest piped
# into tail and stopped by its timeout returns nothing (sixth session, one wasted call).
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --upgrade --target /tmp/site . || exit 1
export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH
[ -d .gpudata/shared ] && [ ! -e ../shared ] && cp -r .gpudata/shared ..
# -P: the checkout's slidejob/ (without model/ and training/ mapped in) must not shadow the installed package.
PY="python3 -P"
{ nvidia-smi; nproc; $PY -c "import torch, dask, zarr, tifffile, slidejob; print(torch.__version__, torch.cuda.get_device_name(0), dask.__version__, zarr.__version__, tifffile.__version__, slidejob.__file__)"; } 2>&1 | tee "$OUT/env.txt"
[ -n "${SKIP_GPU_TESTS:-}" ] || timeout "${GPU_TESTS_S:-150}" $PY -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee "$OUT/gpu-tests.txt"
[ -n "${SKIP_BENCH:-}" ] || timeout "${BENCH_S:-300}" $PY bench/bench_run.py --skip-memory --gpu-sweep "${GPU_SWEEP:-1x15x1,2x7x1,4x4x1,8x2x1,4x3x1:heap}" --workdir /tmp/bench-out 2>&1 | tee "$OUT/bench-run.txt"
[ -n "${SKIP_RUN_TESTS:-}" ] || timeout "${RUN_TESTS_S:-300}" $PY -m pytest -q -p no:cacheprovider tests/test_run.py tests/test_infer.py tests/model 2>&1 | tee "$OUT/run-tests.txt"
