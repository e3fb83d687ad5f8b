"""Builds fastvlm_kernels._C (the C++ CPU kernels in csrc/) with torch.utils.cpp_extension + ninja.
The project's metadata is in pyproject.toml.

torch is deliberately not a build requirement: install with
    pip install --no-build-isolation -e .
against the torch already installed (pip install torch==2.13.0).
"""
import glob
import os

from setuptools import setup

try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError as e:  # pragma: no cover
    raise SystemExit("setup.py needs torch installed first (pip install torch==2.13.0), then "
                     "pip install --no-build-isolation -e .") from e

here = os.path.dirname(os.path.abspath(__file__))
# One translation unit per ISA (csrc/isa/), one per op (csrc/ops/), and the registration: ninja
# compiles them in parallel (MAX_JOBS caps the jobs).
sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
# -fopenmp: at::parallel_for is an inline template that only runs in parallel when the extension
# itself is compiled with OpenMP. The extension then binds to the libgomp.so.1 torch already loaded,
# so torch.set_num_threads() governs it.
cxx_flags = ["-O3", "-std=c++17", "-fno-math-errno", "-fopenmp", "-Wall", "-Wno-unknown-pragmas"]
if os.environ.get("FASTVLM_DEBUG"):
    cxx_flags = ["-O1", "-g", "-std=c++17", "-fopenmp", "-fno-omit-frame-pointer"]
link_flags = ["-fopenmp"]
if os.environ.get("FASTVLM_ASAN"):
    cxx_flags += ["-fsanitize=address", "-fno-omit-frame-pointer"]
    link_flags += ["-fsanitize=address"]

if os.environ.get("FASTVLM_EMULATE_AVX512"):
    # Test builds only (scripts/asan.sh): the AVX-512 kernels compiled for AVX2 (csrc/isa/avx512*.cpp), so their
    # 16-lane logic is exercised on CPUs without AVX-512. Never for use: ~8x slower than the AVX2 build.
    cxx_flags += ["-DFASTVLM_EMULATE_AVX512", "-Wno-psabi"]

# The package's metadata, dependencies and extras are in pyproject.toml; this file builds the extension.
setup(
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
