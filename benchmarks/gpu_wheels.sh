#!/usr/bin/env bash
# Make, here, the wheels benchmarks/gpu_check.sh installs on the GPU machine, in .whl/ (ignored by git):
# diffusers (that machine has torch and transformers but not diffusers, and no network) and cpreg
# itself, built from this checkout. Run it again after changing the code; carry .whl with the run.
#
#   bash benchmarks/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
diffusers=$("$python" -c "import diffusers; print(diffusers.__version__)")
rm -f .whl/cpreg-*.whl
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "diffusers==$diffusers" importlib_metadata
"$python" -m pip wheel -q --no-deps -w .whl .
ls -l .whl
