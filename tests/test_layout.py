"""The package's layout promise (docs/architecture.md, "Adding an op"): an op is its own module
(``ops/<op>.py``: contract, reference, fused module) plus one module and one line of registration per
backend that implements it; nothing else in the package changes."""
import hashlib
import importlib
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import pytest

import fastvlm_kernels as fk
from fastvlm_kernels import ops
from fastvlm_kernels.modules import FUSED_TYPES
from fastvlm_kernels.ops._fused import _Fused

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_each_backend_lists_its_ops_once_with_a_module_each(backend):
    pkg = importlib.import_module(f"fastvlm_kernels.{backend}")
    assert len(pkg.OPS) == len(set(pkg.OPS)) and set(pkg.OPS) <= set(ops.OPS)
    for op in pkg.OPS:
        path = ROOT / "fastvlm_kernels" / backend / f"{op}.py"
        assert path.exists(), path
        assert "def run(" in path.read_text()
    if backend == "cpu":  # the bf16-pair weights are among the op's 1x1 weights
        for op in pkg.OPS:
            assert set(importlib.import_module(f"fastvlm_kernels.cpu.{op}").PAIRS) <= set(ops.linear_weights(op))


def test_every_op_module_holds_its_contract_reference_and_fused_module():
    for op in ops.OPS:
        mod = ops.contract(op)
        assert callable(mod.reference) and isinstance(mod.LINEAR_WEIGHTS, tuple)
        assert hasattr(__import__("torch").ops.fastvlm, op)
        fused = [t for t in vars(mod).values() if isinstance(t, type) and issubclass(t, _Fused) and t.OP == op]
        assert len(fused) == 1 and fused[0] in FUSED_TYPES
    assert len(FUSED_TYPES) == len(ops.OPS)


_NEW_OP = '''
"""``fastvlm::scale_shift``: y = x * a + b per channel (a test op)."""
import torch
from torch import Tensor

from . import define, kernel_for
from ._checks import check_w, check_x
from ._fused import _Fused

LINEAR_WEIGHTS = ()


def _check(x, a, b):
    check_x("scale_shift", x)
    check_w("scale_shift", "a", a, (x.shape[3],), x)
    check_w("scale_shift", "b", b, (x.shape[3],), x)
    return tuple(x.shape)


@define
def scale_shift(x: Tensor, a: Tensor, b: Tensor, backend: str) -> Tensor:
    _check(x, a, b)
    return kernel_for("scale_shift", backend)(x, a, b)


@scale_shift.register_fake
def _(x, a, b, backend):
    return x.new_empty(_check(x, a, b))


def reference(x, a, b):
    return x * a + b


class FusedScaleShift(_Fused):
    OP = "scale_shift"

    def __init__(self, a, b, backend, dtype):
        super().__init__(backend, dtype)
        self._pack("a", a)
        self._pack("b", b)

    def forward(self, x):
        return torch.ops.fastvlm.scale_shift(x, self.a, self.b, self.backend)
'''

_NEW_CPU = '''
"""``scale_shift`` on the cpu backend (a test op: torch, standing in for a C++ kernel)."""


def run(x, a, b):
    return x * a + b
'''

_CHECK = '''
import torch, warnings
warnings.simplefilter("error")
import fastvlm_kernels as fk
from fastvlm_kernels import ops, modules
assert "scale_shift" in ops.OPS and modules.FusedScaleShift in modules.FUSED_TYPES
torch.manual_seed(0)
x, a, b = torch.randn(2, 3, 5, 4), torch.randn(4), torch.randn(4)
m = modules.FusedScaleShift(a, b, "reference", torch.float32)
want = x * a + b
assert torch.allclose(m(x), want)
assert set(fk.available_backends()) >= {"reference", "cpu"}, fk.available_backends()
assert torch.allclose(torch.ops.fastvlm.scale_shift(x, a, b, "cpu"), want)
assert "scale_shift" in ops.backend_ops("cpu")
c = torch.compile(lambda x: torch.ops.fastvlm.scale_shift(x, a, b, "cpu"), backend="eager", fullgraph=True)
assert torch.allclose(c(x), want)
print("ok")
'''


def _digest(root: pathlib.Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*.py"))}


def _add_line(path: pathlib.Path, after: str, line: str) -> None:
    text = path.read_text()
    assert text.count(after) == 1, (path, after)
    path.write_text(text.replace(after, after + line, 1))


@pytest.mark.skipif(not fk.extension_available(), reason="the C++ extension is not built")
def test_adding_an_op_touches_its_files_and_one_line_per_backend(tmp_path):
    """A copy of the package gains an op: ops/scale_shift.py, cpu/scale_shift.py, and one line in
    each registry. It runs through the reference and cpu backends, torch.compile traces it, and no
    other file of the package changed."""
    pkg = tmp_path / "fastvlm_kernels"
    shutil.copytree(ROOT / "fastvlm_kernels", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    before = _digest(pkg)
    (pkg / "ops" / "scale_shift.py").write_text(textwrap.dedent(_NEW_OP))
    (pkg / "cpu" / "scale_shift.py").write_text(textwrap.dedent(_NEW_CPU))
    _add_line(pkg / "ops" / "__init__.py", '    "conv_exp",\n', '    "scale_shift",\n')
    _add_line(pkg / "cpu" / "__init__.py", '    "conv_exp",\n', '    "scale_shift",\n')
    after = _digest(pkg)
    changed = sorted(k for k in after if before.get(k) != after[k])
    assert changed == ["cpu/__init__.py", "cpu/scale_shift.py", "ops/__init__.py", "ops/scale_shift.py"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    r = subprocess.run([sys.executable, "-c", _CHECK], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]
