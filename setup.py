"""Builds fastvlm_kernels._C (the C++ CPU kernels in csrc/) with torch.utils.cpp_extension + ninja.

torch is deliberately not a build requirement: install with
    pip install --no-build-isolation -e .
against the torch already installed (pip install torch==2.13.0).
"""
import glob
import os

from setuptools import find_packages, setup

try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError as e:  # pragma: no cover
    raise SystemExit("setup.py needs torch installed first (pip install torch==2.13.0), then "
                     "pip install --no-build-isolation -e .") from e

here = os.path.dirname(os.path.abspath(__file__))
sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
# -fopenmp: at::parallel_for is an inline template that only runs in parallel when the extension
# itself is compiled with OpenMP. The extension then binds to the libgomp.so.1 torch already loaded,
# so torch.set_num_threads() governs it.
cxx_flags = ["-O3", "-std=c++17", "-fno-math-errno", "-fopenmp", "-Wall", "-Wno-unknown-pragmas"]
if os.environ.get("FASTVLM_DEBUG"):
    cxx_flags = ["-O1", "-g", "-std=c++17", "-fopenmp", "-fno-omit-frame-pointer"]
link_flags = ["-fopenmp"]
if os.environ.get("FASTVLM_ASAN"):
    cxx_flags += ["-fsanitize=address", "-fno-omit-frame-pointer", "-DFASTVLM_NO_CLONES"]
    link_flags += ["-fsanitize=address"]

if os.environ.get("FASTVLM_EMULATE_AVX512"):
    # Test builds only (scripts/asan.sh): the AVX-512 kernels compiled for AVX2 (ffn.cpp), so their
    # 16-lane logic is exercised on CPUs without AVX-512. Never for use: ~8x slower than the AVX2 build.
    cxx_flags += ["-DFASTVLM_EMULATE_AVX512", "-Wno-psabi"]

setup(
    name="fastvlm-kernels",
    version="0.1.0",
    description="Fused CPU (C++) and GPU (Triton) kernels for Apple's FastVLM / FastViTHD",
    packages=find_packages(include=["fastvlm", "fastvlm.*", "fastvlm_kernels", "fastvlm_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["numpy", "pillow", "safetensors"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "openai"],
        "bench": ["pytest-benchmark", "onnxruntime", "onnx", "matplotlib"],
        # transformers: 4.50 (Qwen2's logits_to_keep) up to the next major; tested with 5.25. Its FastVLM
        # classes (accelerate() on FastVlmForConditionalGeneration) need a transformers that has them.
        "vlm": ["transformers>=4.50,<6", "tokenizers"],
        # timm's FastVit (fastvit_mci3), which transformers' FastVLM wraps
        "timm": ["timm>=1.0"],
        "gpu": ["triton"],
        # fastvlm serve: the OpenAI-compatible HTTP server; [ray]: the same app on Ray Serve
        "serve": ["transformers>=4.50,<6", "tokenizers", "fastapi", "uvicorn"],
        "ray": ["transformers>=4.50,<6", "tokenizers", "fastapi", "uvicorn", "ray[serve]"],
    },
    entry_points={"console_scripts": ["fastvlm=fastvlm.cli:main"]},
    ext_modules=[
        CppExtension(
            "fastvlm_kernels._C",
            sources,
            include_dirs=[os.path.join(here, "csrc")],
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
