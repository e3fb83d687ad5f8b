#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
"${PYTHON:-python3}" -m pytest tests -q -ra "$@"
# The AOT check once more under each other Triton the kernel tables are checked against
# (kernels.AOT_TRITONS: the GPU machines run 3.6): scripts/aot_triton.sh.
for v in $("${PYTHON:-python3}" -c 'import triton; from fastvlm_kernels.triton.kernels import AOT_TRITONS as T
print(" ".join(t for t in T if not triton.__version__.startswith(t + ".")))' || true); do
  bash scripts/aot_triton.sh "$v"
done
# The C++ op tests once more against an AddressSanitizer build (small shapes), when gcc has libasan.
if [ -f "$(${CC:-gcc} -print-file-name=libasan.so 2>/dev/null)" ]; then
  bash scripts/asan.sh
else
  echo "[test] NOTE: no libasan for ${CC:-gcc}: the AddressSanitizer run of the C++ op tests was skipped"
fi
