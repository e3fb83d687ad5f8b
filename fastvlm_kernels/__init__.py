"""fastvlm_kernels: fused kernels for FastViTHD (C++ for CPUs, Triton for NVIDIA GPUs).

The compiled extension ``fastvlm_kernels._C`` is optional: without it the package imports, the
reference paths work, and one warning says why the C++ kernels are unavailable.
"""
from ._ext import extension_available, extension_error, load_extension

__all__ = ["extension_available", "extension_error", "load_extension"]
__version__ = "0.1.0"
