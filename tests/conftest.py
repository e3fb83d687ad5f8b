import os
import sys

import pytest
import torch

# Test this checkout, whatever an editable install elsewhere points at.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Without a GPU the triton backend is tested through Triton's interpreter. The variable must be set
# before triton is first imported (its standard-library functions are made interpretable then), and
# several test modules import it indirectly through fastvlm_kernels.available_backends().
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# timm (and transformers' timm wrapper, FastVLM's vision tower) need torchvision importable, though the
# FastViT model code never uses it. Where no real torchvision imports (PyPI's does not beside the CPU
# build of torch these tests run on), a test-only stand-in takes its place: tests/torchvision_standin.
try:
    import torchvision  # noqa: F401
except Exception:  # not installed, or built for another torch
    for _name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[_name]
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "torchvision_standin"))

# Keep runs on the 2-core machines predictable; tests never depend on timing.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

import fastvlm  # noqa: E402
from fastvlm.testing import randomize_  # noqa: E402


@pytest.fixture(scope="session")
def tiny_cfg():
    return fastvlm.FastViTHDConfig.tiny()


def make_model(config=None, inference_mode=False, seed=0, dtype=torch.float64):
    m = fastvlm.FastViTHD(config, inference_mode=inference_mode)
    randomize_(m, seed)
    return m.eval().to(dtype)
