#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
"${PYTHON:-python3}" -m pytest tests -q -ra "$@"
# The C++ op tests once more against an AddressSanitizer build (small shapes), when gcc has libasan.
if [ -f "$(${CC:-gcc} -print-file-name=libasan.so 2>/dev/null)" ]; then
  bash scripts/asan.sh
else
  echo "[test] NOTE: no libasan for ${CC:-gcc}: the AddressSanitizer run of the C++ op tests was skipped"
fi
