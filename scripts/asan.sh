#!/usr/bin/env bash
# Builds the C++ extension with AddressSanitizer into a scratch directory (the installed build is
# left alone) and runs the C++ op tests against it at their small shapes. Fails on any ASan report.
# On a CPU without AVX-512 the build compiles the AVX-512 kernels for AVX2 (FASTVLM_EMULATE_AVX512),
# so the tests' every-ISA cases run that path as well: its numerics and its memory accesses (and the
# AVX512_BF16 GEMMs, with vdpbf16ps written out in vector code: isa.h then offers avx512_bf16), and
# the whole-encoder fp32 / bf16 parity tests on the cpu backend.
# (Left out: opcheck, the no-extension subprocess and the MALLOC_PERTURB_ test, which needs glibc malloc.)
# Needs gcc's libasan (preloaded: python itself is not instrumented; leak checking is off because
# the interpreter's own allocations are never freed).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
say() { printf '[asan] %s\n' "$*"; }
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
emu=
if ! grep -q -w avx512f /proc/cpuinfo 2>/dev/null && grep -q -w avx2 /proc/cpuinfo 2>/dev/null; then
  # No AVX-512 here: build its kernels for AVX2 (setup.py's FASTVLM_EMULATE_AVX512), so this run
  # checks the AVX-512 path's logic and bounds too, beside the AVX2 and SSE paths.
  emu=1
  say "this CPU has no AVX-512: the AVX-512 (and AVX512_BF16) kernels are built for AVX2 (emulated, 2 x 256-bit) and tested too"
fi
say "building fastvlm_kernels._C with -fsanitize=address in $out"
FASTVLM_EMULATE_AVX512=$emu FASTVLM_ASAN=1 "$PY" setup.py -q build_ext --build-temp "$out/build" --build-lib "$out/lib" > "$out/build.log" 2>&1 \
  || { tail -30 "$out/build.log"; exit 1; }
so=$(find "$out/lib" -name '_C*.so' | head -1)
libasan=$(${CC:-gcc} -print-file-name=libasan.so)
libstdcxx=$(${CC:-gcc} -print-file-name=libstdc++.so)  # so ASan's __cxa_throw interceptor finds the real one
say "running the C++ op tests (tests/test_cpu_*.py), the cpu cases of tests/test_ops.py and the whole-encoder parity tests under ASan ($libasan)"
# pytest captures stderr, so ASan writes its report to files, shown on failure.
rc=0
FASTVLM_EXT="$so" LD_PRELOAD="$libasan $libstdcxx" \
  ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:log_path=$out/asan" \
  "$PY" -m pytest tests/test_cpu_*.py tests/test_ops.py -q -x -k "not opcheck and not without_extension and not every_output_element" -p no:cacheprovider "$@" || rc=$?
# the whole encoder on the cpu backend, fp32 and bf16 (with emulation: the AVX-512 / AVX512_BF16 paths end to end),
# and its packed weights through state_dict / load_state_dict / backend switches (bf16 pairs when emulated)
[ "$rc" = 0 ] && { FASTVLM_EXT="$so" LD_PRELOAD="$libasan $libstdcxx" \
  ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:log_path=$out/asan" \
  "$PY" -m pytest "tests/test_accelerate.py::test_whole_encoder_parity" \
  "tests/test_accelerate.py::test_whole_encoder_bf16_no_worse_than_eager_bf16" \
  "tests/test_accelerate.py::test_cpu_packed_model_state_dict_and_backend_switch" -q -x -k cpu -p no:cacheprovider "$@" \
  || rc=$?; }
if ls "$out"/asan* > /dev/null 2>&1; then
  cat "$out"/asan*
  say "FAILED: AddressSanitizer reported errors"
  exit 1
fi
[ "$rc" = 0 ] || { say "FAILED: the tests failed under ASan (exit $rc)"; exit "$rc"; }
say "clean"
