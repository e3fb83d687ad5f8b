"""fastvlm_kernels: fused kernels for FastViTHD (C++ for CPUs, Triton for NVIDIA GPUs).

    fastvlm_kernels.accelerate(model, backend="auto", dtype=None)   # in place; returns model
    fastvlm_kernels.available_backends()                            # e.g. ["reference", "cpu"]

The compiled extension ``fastvlm_kernels._C`` is optional: without it the package imports, the
reference paths work, and one warning says why the C++ kernels are unavailable.
"""
from ._ext import extension_available, extension_error, load_extension
from . import ops
from .backends import available_backends, resolve_backend, unavailable_reason
from .accelerate import accelerate, is_accelerated

__all__ = ["accelerate", "available_backends", "unavailable_reason", "resolve_backend", "is_accelerated", "ops",
           "extension_available", "extension_error", "load_extension"]
__version__ = "0.1.0"
