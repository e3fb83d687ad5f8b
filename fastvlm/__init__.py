"""fastvlm: a clean pure-PyTorch FastVLM (FastViTHD encoder, projector, preprocessing, loaders).

This package is the reference every fused kernel is measured against; it never imports
``fastvlm_kernels``.
"""
from .fastvithd import FastViTHD, FastViTHDConfig
from .projector import Projector, PROJECTOR_HIDDEN_SIZES
from .preprocess import preprocess
from .checkpoint import (
    CheckpointError, CheckpointMismatchError, CorruptCheckpointError, UnknownLayoutError,
    convert_state_dict, detect_layout, load_projector, load_vision_tower, read_state_dict,
)
from . import reparam

__all__ = [
    "FastViTHD", "FastViTHDConfig", "Projector", "PROJECTOR_HIDDEN_SIZES", "preprocess",
    "load_vision_tower", "load_projector", "read_state_dict", "detect_layout", "convert_state_dict",
    "CheckpointError", "CheckpointMismatchError", "CorruptCheckpointError", "UnknownLayoutError", "reparam",
]
__version__ = "0.1.0"
