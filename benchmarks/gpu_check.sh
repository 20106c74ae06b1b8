#!/usr/bin/env bash
# The GPU acceptance run of m2mix-openclip: one GPU, no network, under 8 minutes (docs/performance.md).
#
#   bash benchmarks/gpu_check.sh --wheels DIR [--out DIR]     # on the GPU machine
#   bash benchmarks/gpu_check.sh --cpu-smoke [--wheels DIR]   # the same steps on the CPU, tiny (CI)
#
# With --wheels: installs, with no index and no dependencies, what the run needs and the machine
# lacks (OpenCLIP, webdataset, braceexpand, ftfy, ... and this package: its wheel from DIR, else
# built from this checkout) into OUT/site, first on PYTHONPATH; torch, numpy and every other
# package already there stay as they are. Without --wheels (the CPU smoke run only) the
# environment's own packages are used. Then benchmarks/gpu_check.py checks every loss family and
# prints one markdown table (also OUT/gpu_check.md). Exit status: 0 passed, 1 a check failed,
# 2 it could not run. PYTHON picks the interpreter (default: python3).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
PY=${PYTHON:-python3}
WHEELS=""
SMOKE=""
OUT=""
usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
    case "$1" in
        --wheels) WHEELS=${2:?--wheels needs a folder}; shift 2 ;;
        --out) OUT=${2:?--out needs a folder}; shift 2 ;;
        --cpu-smoke) SMOKE=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_check.sh: error: unknown argument $1" >&2; usage >&2; exit 2 ;;
    esac
done
OUT=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/m2mix-gpu-check.XXXXXX")}
mkdir -p "$OUT"
if [ -n "$WHEELS" ]; then
    rm -rf "$OUT/site"
    "$PY" "$HERE/gpu_check.py" install --wheels "$WHEELS" --site "$OUT/site"
    export PYTHONPATH="$OUT/site${PYTHONPATH:+:$PYTHONPATH}"
elif [ -z "$SMOKE" ]; then
    echo "gpu_check.sh: error: --wheels DIR is needed on the GPU machine (how to make DIR: docs/performance.md)" >&2
    exit 2
fi
exec "$PY" "$HERE/gpu_check.py" run ${SMOKE:+--cpu-smoke} --out "$OUT"
