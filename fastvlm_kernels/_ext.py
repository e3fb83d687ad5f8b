"""Loading of the compiled extension, once, with one warning when it is missing.

``FASTVLM_EXT=/path/to/_C.so`` loads that build instead of the installed one (used by CI to run
the op tests against an AddressSanitizer build: scripts/asan.sh)."""
from __future__ import annotations

import os
import warnings
from typing import Optional

_state = {"tried": False, "module": None, "error": None}


def load_extension():
    """The ``fastvlm_kernels._C`` module, or None (warning once) when it was not built."""
    if not _state["tried"]:
        _state["tried"] = True
        try:
            import torch  # noqa: F401  (the extension links against libtorch)
            path = os.environ.get("FASTVLM_EXT")
            if path:
                import importlib.util
                import sys
                spec = importlib.util.spec_from_file_location("fastvlm_kernels._C", path)
                if spec is None:
                    raise ImportError(f"FASTVLM_EXT={path!r} is not a loadable extension")
                _C = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(_C)
                sys.modules["fastvlm_kernels._C"] = _C
            else:
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
