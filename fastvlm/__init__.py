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

# The VLM needs transformers (an optional extra); import it lazily so the encoder works without it.
_LAZY = {"FastVLM", "TTFT", "GenerationOutput", "MissingTokenizerError", "chat_prompt"}


def __getattr__(name):
    if name in _LAZY:
        from . import vlm
        return getattr(vlm, name)
    raise AttributeError(f"module 'fastvlm' has no attribute {name!r}")


__all__ = [
    "FastViTHD", "FastViTHDConfig", "Projector", "PROJECTOR_HIDDEN_SIZES", "preprocess",
    "load_vision_tower", "load_projector", "read_state_dict", "detect_layout", "convert_state_dict",
    "CheckpointError", "CheckpointMismatchError", "CorruptCheckpointError", "UnknownLayoutError", "reparam",
    "FastVLM", "TTFT", "GenerationOutput", "MissingTokenizerError", "chat_prompt",
]
__version__ = "0.1.0"
