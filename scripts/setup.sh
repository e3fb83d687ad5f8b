#!/usr/bin/env bash
# Installs what the project needs into the current Python, then builds the C++ extension in place.
#   bash scripts/setup.sh          # runtime + tests
#   bash scripts/setup.sh bench    # + the benchmark's peers (onnxruntime, onnx, matplotlib)
# torch comes from the pinned CPU build (pip finds it on disk); never let pip resolve it from the
# registry, which would pull GBs of CUDA packages. The extension is built against it with
# --no-build-isolation, so torch is not a build requirement.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
say() { printf '[setup] %s\n' "$*"; }

have_torch=$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || true)
if [ "$have_torch" != "2.13.0" ]; then
  say "installing torch==2.13.0 (CPU build)"
  "$PY" -m pip install -q torch==2.13.0
fi
say "installing Python dependencies"
"$PY" -m pip install -q numpy pillow safetensors ninja pytest pytest-benchmark
say "installing the VLM extra (transformers, tokenizers) and triton (CPU interpreter + AOT compile checks)"
"$PY" -m pip install -q "transformers>=4.50,<6" tokenizers triton
# timm (fastvit_mci3, the vision tower transformers' FastVLM wraps) without its dependencies: they
# include torchvision, whose PyPI build would bring its own torch. Its model code needs only torch and
# pyyaml; the tests supply an import stand-in for torchvision where none imports (tests/conftest.py).
say "installing timm (without dependencies)"
"$PY" -m pip install -q pyyaml huggingface_hub
"$PY" -m pip install -q --no-deps "timm>=1.0"
say "installing the serving extras (fastapi, uvicorn, ray[serve]) and the openai client (tests, benchmark)"
"$PY" -m pip install -q fastapi uvicorn "ray[serve]" openai
if [ "${1:-}" = "bench" ]; then
  say "installing benchmark peers (onnxruntime, onnx, onnxscript, matplotlib)"
  "$PY" -m pip install -q onnxruntime onnx onnxscript matplotlib || say "WARNING: benchmark extras failed to install; the report will skip those peers"
fi
say "building fastvlm_kernels._C (C++ extension) in place"
"$PY" -m pip install -q --no-build-isolation --no-deps -e .
"$PY" -c 'import fastvlm_kernels as k; assert k.extension_available(), k.extension_error(); print("[setup] extension OK")'
