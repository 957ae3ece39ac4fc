#!/usr/bin/env bash
# What a session lent a GPU machine runs there, in one call of at most 10 minutes: install the wheels carried in
# .whl/ (`make gpu-wheels` fetches them here), the GPU tests, then `make bench` at sizes that fit the call. Every
# output goes to $OUT (the folder that comes back) or bench/out/gpu; commit the curated result under
# bench/results/<card>/<date>/. Settings: BENCH_GPU_SIZES (default 64MiB,256MiB,1GiB; run 4GiB / 16GiB in calls
# of their own), BENCH_SIZES (the CPU rows, default 64MiB,256MiB; empty: none), SKIP_TESTS=1, TEST_LIMIT / BENCH_LIMIT
# (seconds). Exits non-zero when the tests or the bench failed or ran out of time.
set -u
out=${OUT:-bench/out/gpu}
mkdir -p "$out"
export PYTHONPATH=/tmp/site:$PWD
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
elif ! python3 -c "import kvikio" >/dev/null 2>&1; then
  echo "no wheels in .whl/ and no kvikio here: run 'make gpu-wheels' and carry .whl" | tee "$out/machine.txt"
  exit 2
fi
{
  date -u
  nvidia-smi
  python3 -c "import torch, kvikio, zarr; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'kvikio',
kvikio.__version__, 'zarr', zarr.__version__)"
} >"$out/machine.txt" 2>&1
tail -3 "$out/machine.txt"
tests=0
if [ -z "${SKIP_TESTS:-}" ]; then
  timeout "${TEST_LIMIT:-180}" make test-gpu PY=python3 >"$out/test-gpu.txt" 2>&1
  tests=$?
  echo "make test-gpu exit $tests" >>"$out/test-gpu.txt"
  tail -5 "$out/test-gpu.txt"
fi
# The entries' files (GBs at the large sizes) stay on this machine's disk, beside the tree, not in $OUT.
scratch=$PWD/bench/out/gpu-scratch
root=${BENCH_ROOT:-$scratch/root}
BENCH_OUT="$out" BENCH_ROOT="$root" BENCH_SIZES="${BENCH_SIZES-64MiB,256MiB}" \
  BENCH_GPU_SIZES="${BENCH_GPU_SIZES-64MiB,256MiB,1GiB}" \
  timeout "${BENCH_LIMIT:-330}" make bench PY=python3 >"$out/bench.txt" 2>&1
bench=$?
rm -rf "$root" "$scratch"
echo "make bench exit $bench" >>"$out/bench.txt"
tail -60 "$out/bench.txt"
exit $((tests != 0 || bench != 0))
