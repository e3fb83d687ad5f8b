"""A test-only import stand-in for torchvision (see tests/torchvision_standin/README.md).

timm's model code does not use torchvision, but ``import timm`` imports modules that do (its data
pipeline, FrozenBatchNorm2d), and transformers treats timm as available only when torchvision is
importable. This package provides exactly the names those imports need: the one class timm's
model code can touch (``ops.misc.FrozenBatchNorm2d``) is real; every other name is a placeholder
that raises :class:`StandInError` when it is called, so nothing can silently use it.
"""
from ._placeholder import StandInError, placeholder_module_getattr

__version__ = "0.0.0+fastvlm.standin"
IS_FASTVLM_STANDIN = True

__getattr__ = placeholder_module_getattr(__name__)

__all__ = ["StandInError", "IS_FASTVLM_STANDIN"]
