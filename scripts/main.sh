#!/usr/bin/env bash
# Sets up (scripts/setup.sh bench) and runs the end-to-end report. Arguments go to bench/report.py,
# e.g. --checkpoint PATH, --quick.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh bench
exec "${PYTHON:-python3}" -m bench.report "$@"
