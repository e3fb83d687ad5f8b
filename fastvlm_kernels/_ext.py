"""Loading of the compiled extension, once, with one warning when it is missing."""
from __future__ import annotations

import warnings
from typing import Optional

_state = {"tried": False, "module": None, "error": None}


def load_extension():
    """The ``fastvlm_kernels._C`` module, or None (warning once) when it was not built."""
    if not _state["tried"]:
        _state["tried"] = True
        try:
            import torch  # noqa: F401  (the extension links against libtorch)
            from . import _C  # noqa: F401
            _state["module"] = _C
        except Exception as e:  # ImportError, or an ABI mismatch surfacing as OSError
            _state["error"] = f"{type(e).__name__}: {e}"
            warnings.warn(
                "fastvlm_kernels: the C++ extension fastvlm_kernels._C is not available "
                f"({_state['error']}); the CPU kernels are disabled and the reference paths are used. "
                "Build it with: pip install --no-build-isolation -e .",
                RuntimeWarning, stacklevel=2)
    return _state["module"]


def extension_available() -> bool:
    return load_extension() is not None


def extension_error() -> Optional[str]:
    load_extension()
    return _state["error"]
