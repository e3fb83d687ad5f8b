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
