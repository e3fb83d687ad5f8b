#!/usr/bin/env bash
# Installs what the project needs into the current Python, then builds the C++ extension in place.
#   bash scripts/setup.sh          # runtime + tests
#   bash scripts/setup.sh bench    # + the benchmark's peers (onnxruntime, onnx, matplotlib)
# torch: a CUDA build already installed is kept (the GPU machines come with one, and no network);
# otherwise the pinned CPU build, 2.13.0, which pip finds on disk. Never let pip resolve torch from
# the registry, which would pull GBs of CUDA packages: the extension is built against the installed
# torch with --no-build-isolation, so torch is not a build requirement. The optional groups (timm,
# serving, benchmark peers) warn instead of failing where they cannot be installed (no network):
# their tests then skip. FASTVLM_SETUP_DRY_RUN=1 prints the commands instead of running them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
say() { printf '[setup] %s\n' "$*"; }
run() {
  if [ -n "${FASTVLM_SETUP_DRY_RUN:-}" ]; then say "would run: $*"; else "$@"; fi
}
optional() {  # run "$@"; on failure, one warning instead of an exit
  run "$@" || say "WARNING: could not run '$*' (offline?): the parts that need it will be skipped"
}

read -r have_torch have_cuda <<< "$("$PY" -c 'import torch; print(torch.__version__.split("+")[0], torch.version.cuda or "")' 2>/dev/null || true)"
if [ -n "${have_cuda:-}" ]; then
  say "keeping the installed torch ${have_torch} (CUDA ${have_cuda}): the CPU build is not installed over it"
elif [ "${have_torch:-}" != "2.13.0" ]; then
  say "installing torch==2.13.0 (CPU build)"
  run "$PY" -m pip install -q torch==2.13.0
fi
say "installing Python dependencies"
run "$PY" -m pip install -q numpy pillow safetensors ninja pytest pytest-benchmark
say "installing the VLM extra (transformers, tokenizers) and triton (CPU interpreter + AOT compile checks)"
run "$PY" -m pip install -q "transformers>=4.50,<6" tokenizers triton
# timm (fastvit_mci3, the vision tower transformers' FastVLM wraps) without its dependencies: they
# include torchvision, whose PyPI build would bring its own torch. Its model code needs only torch and
# pyyaml; the tests supply an import stand-in for torchvision where none imports (tests/conftest.py).
say "installing timm (without dependencies)"
optional "$PY" -m pip install -q pyyaml huggingface_hub
optional "$PY" -m pip install -q --no-deps "timm>=1.0"
say "installing the serving extras (fastapi, uvicorn, ray[serve]) and the openai client (tests, benchmark)"
optional "$PY" -m pip install -q fastapi uvicorn "ray[serve]" openai
if [ "${1:-}" = "bench" ]; then
  say "installing benchmark peers (onnxruntime, onnx, onnxscript, matplotlib)"
  optional "$PY" -m pip install -q onnxruntime onnx onnxscript matplotlib
fi
say "building fastvlm_kernels._C (C++ extension) in place"
run "$PY" -m pip install -q --no-build-isolation --no-deps -e .
run "$PY" -c 'import fastvlm_kernels as k; assert k.extension_available(), k.extension_error(); print("[setup] extension OK")'
