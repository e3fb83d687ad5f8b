#!/usr/bin/env bash
# The AOT check (tests/test_triton.py -k compiles_for: what runs compiles for sm_90 and sm_80 without
# spills) under another Triton, whose ptxas and register allocation may differ from the installed one:
#
#   bash scripts/aot_triton.sh 3.6     # the Triton of the GPU machines this project is lent
#
# It runs in a virtual environment, build/triton-VERSION (or $AOT_TRITON_ENV), that sees this Python's
# packages (torch, pytest, ...) with that Triton installed over them (a ~190 MB wheel, kept for the
# next run).
# scripts/test.sh calls it for each Triton of kernels.AOT_TRITONS other than the installed one.
# Where that Triton cannot be installed (no network), it warns and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."
V=${1:?usage: bash scripts/aot_triton.sh VERSION (major.minor, e.g. 3.6)}
PY=${PYTHON:-python3}
ENV=${AOT_TRITON_ENV:-build/triton-$V}
has_it() { "$ENV/bin/python" -c "import sys, triton; sys.exit(not triton.__version__.startswith('$V.'))" 2>/dev/null; }
if ! has_it; then
  rm -rf "$ENV"
  mkdir -p "$(dirname "$ENV")"
  "$PY" -m venv --system-site-packages "$ENV"
  if ! "$ENV/bin/python" -m pip install -q --no-deps "triton==$V.*" || ! has_it; then
    echo "[aot_triton] WARNING: could not install triton $V (offline?): the AOT check under it was skipped"
    rm -rf "$ENV"
    exit 0
  fi
fi
echo "[aot_triton] the AOT check under triton $("$ENV/bin/python" -c 'import triton; print(triton.__version__)')"
"$ENV/bin/python" -m pytest tests/test_triton.py -q -ra -p no:cacheprovider -k compiles_for
