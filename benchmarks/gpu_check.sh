#!/usr/bin/env bash
# One prepared GPU run of cpreg (docs/benchmarks.md, "GPU"); writes OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.log.
#
#   bash benchmarks/gpu_check.sh OUT_DIR          # one H200: SD 1.5 architecture, under 8 minutes
#   bash benchmarks/gpu_check.sh OUT_DIR --dry    # the CPU: the tiny pipeline, the same code paths
#
# On a machine where cpreg does not import (the GPU machine has torch and transformers but no
# diffusers, and no network), the wheels of .whl/ (benchmarks/gpu_wheels.sh: diffusers and cpreg)
# are installed into /tmp/cpreg-site first.
set -euo pipefail
mkdir -p "${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR [--dry]}"
out=$(cd "$1" && pwd)
shift
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ -d .whl ] && ! "$python" -c "import cpreg.editors" 2>/dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/cpreg-site .whl/*.whl
    export PYTHONPATH=/tmp/cpreg-site${PYTHONPATH:+:$PYTHONPATH}
fi
# the script keeps to 420 s of sections; this stops a hung run before the device's 10-minute limit
exec timeout --kill-after=10 480 "$python" benchmarks/gpu_check.py --out "$out" "$@"
