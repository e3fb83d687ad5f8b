"""The backend registry (fastvlm_kernels.backends): a backend declares itself and is found, loaded,
resolved and used by accelerate() without any other file naming it."""
import pytest
import torch

import fastvlm
import fastvlm_kernels as fk
from fastvlm.testing import random_tower
from fastvlm_kernels import backends, ops


@pytest.fixture
def declare():
    """Declare test backends; remove them (and their kernels) afterwards."""
    names = []

    def _declare(backend):
        names.append(backend.name)
        return backends.register(backend)
    yield _declare
    for n in names:
        backends._DECLARED.pop(n, None)
        backends._LOADED.pop(n, None)
        for op in ops.OPS:
            ops._KERNELS[op].pop(n, None)


def _counting_reference_kernels(name, calls, skip=()):
    from fastvlm_kernels import reference

    def load():
        for op in ops.OPS:
            if op in skip:
                continue
            fn = getattr(reference, op)
            ops.register_kernel(op, name, lambda *a, _fn=fn, _op=op: (calls.append(_op), _fn(*a))[1])
    return load


def test_a_declared_backend_runs_the_model(declare):
    calls, prepared = [], []
    declare(backends.Backend(name="counting", devices=("cpu",), dtypes=(torch.float32,),
                             load=_counting_reference_kernels("counting", calls),
                             prepare=lambda enc: prepared.append(enc)))
    assert "counting" in fk.available_backends()
    m = random_tower(fastvlm.FastViTHDConfig.tiny(), seed=3).eval()
    x = torch.rand(1, 3, 70, 90)
    with torch.no_grad():
        want = m(x)
    fk.accelerate(m, backend="counting")
    with torch.no_grad():
        got = m(x)
    assert m.accelerated_backend == "counting" and prepared == [m]
    assert set(calls) == set(ops.OPS)          # every op ran through the declared backend
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)
    fk.accelerate(m, backend=backends.FALLBACK)   # and away from it again
    with torch.no_grad():
        assert torch.allclose(m(x), want, rtol=1e-4, atol=1e-5)


def test_declared_limits_are_enforced(declare):
    declare(backends.Backend(name="partial", devices=("cpu",), dtypes=(torch.float32,),
                             load=_counting_reference_kernels("partial", [], skip=("conv_exp",))))
    declare(backends.Backend(name="broken", devices=("cpu",), dtypes=(torch.float32,),
                             unavailable=lambda: "needs a device this machine lacks"))
    declare(backends.Backend(name="gpuonly", devices=("cuda",), dtypes=(torch.float32,),
                             load=_counting_reference_kernels("gpuonly", [])))
    assert "conv_exp" in backends.unavailable_reason("partial")
    assert backends.unavailable_reason("broken") == "needs a device this machine lacks"
    avail = fk.available_backends()
    assert "partial" not in avail and "broken" not in avail and "gpuonly" in avail
    m = random_tower(fastvlm.FastViTHDConfig.tiny(), seed=3).eval()
    with pytest.raises(ValueError, match="needs a device this machine lacks"):
        fk.accelerate(m, backend="broken")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        fk.accelerate(m, backend="gpuonly")
    with pytest.raises(ValueError, match="unknown backend 'nonesuch'"):
        fk.accelerate(m, backend="nonesuch")


def test_auto_follows_the_table():
    cpu_choice = backends.AUTO["cpu"][0]
    got = backends.resolve_backend("auto", torch.device("cpu"), torch.float32)
    assert got == (cpu_choice if backends.unavailable_reason(cpu_choice) is None else backends.FALLBACK)
    assert backends.resolve_backend("auto", torch.device("meta"), torch.float32) == backends.FALLBACK


def _code_strings(mod, after=None):
    """The string constants of a module's code (docstrings left out), optionally after a marker line."""
    import ast
    import inspect
    src = inspect.getsource(mod)
    if after is not None:
        src = src[src.index(after):]
        src = src[src.index("\n") + 1:]
    tree = ast.parse(src)
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef)) and n.body
            and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and id(n) not in docs]


def test_ops_name_no_backend():
    """The ops package (its registry and every op module), modules.py and accelerate.py name no
    backend in their code; backends.py only in its two tables."""
    from fastvlm_kernels import accelerate as acc, modules
    from fastvlm_kernels.ops import _checks, _eager, _fused
    names = {b.name for b in backends.declared()}
    for mod in (ops, _checks, _eager, _fused, modules, acc, *(ops.contract(op) for op in ops.OPS)):
        assert not names & set(_code_strings(mod)), mod.__name__
    assert not names & set(_code_strings(backends, after='FALLBACK = "'))
