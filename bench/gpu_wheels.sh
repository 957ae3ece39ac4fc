#!/usr/bin/env bash
# The wheels a CUDA test machine without network needs for tiercache, fetched here (where a package index answers)
# into DEST (default .whl, which git ignores). Usage: bash bench/gpu_wheels.sh [DEST]; `make gpu-wheels` runs it.
#
# The machine it is for: x86-64, Python 3.12 at `python3`, a CUDA 13 driver, and already installed there torch,
# cupy-cuda13x, numpy, pytest, hypothesis, safetensors, matplotlib and the cuFile library. What it lacks is what
# tiercache adds on top: kvikio (with its C++ library, the logger that library links, and cuda-pathfinder, which
# kvikio 26.10 imports to find the CUDA libraries), zarr with its own dependencies, and the CRC32C libraries (crc32c
# for tiercache's checksums, google-crc32c for zarr's codec and the tests). No dependency resolution happens there,
# so every wheel is named here, for that interpreter and platform, not for this machine's.
#
# There, from the repository root (bench/gpu_session.sh does both):
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site:$PWD
set -eu
dest=${1:-.whl}
python=${PYTHON:-python3}
mkdir -p "$dest"
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
  manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$tag")
done
wheels=(
  kvikio-cu13==26.10.0 libkvikio-cu13==26.10.0 "rapids-logger==0.3.*" cuda-pathfinder
  zarr==3.1.6 numcodecs==0.16.6 donfig
  "crc32c>=2.7" google-crc32c
)
# --no-deps: the machine's own torch, cupy and numpy must stay the ones it has.
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$dest" "${wheels[@]}" 2>&1 | grep -v '^WARNING' || true
for name in kvikio_cu13 libkvikio_cu13 rapids_logger cuda_pathfinder zarr numcodecs donfig crc32c google_crc32c; do
  if ! ls "$dest/${name}"-*.whl >/dev/null 2>&1; then
    echo "gpu_wheels: no $name wheel in $dest" >&2
    exit 1
  fi
done
ls "$dest"
echo
echo "Carry it to the CUDA machine as .whl/ in the tree, and run there from the repository root:"
echo "  bash bench/gpu_session.sh"
