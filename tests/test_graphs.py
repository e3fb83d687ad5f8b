"""fastvlm_kernels.graphs: the CUDA-graph runner's keys, buffers, bound and fallbacks, checked on the
CPU through a stand-in for the CUDA side (the real capture and replay run in scripts/gpu_check.sh)."""
import pytest
import torch

import fastvlm
import fastvlm_kernels as fk
from fastvlm.testing import random_tower
from fastvlm_kernels import graphs


class FakeGraph:
    """Captures fn over a static input; replay recomputes into the same static output buffer."""

    def __init__(self, fn, static_in):
        self.fn, self.static_in = fn, static_in
        self.out = fn(static_in).clone()

    def replay(self):
        self.out.copy_(self.fn(self.static_in))


class FakeCuda:
    capturing_now = False
    warmups = 0

    @staticmethod
    def pool():
        return object()

    @classmethod
    def capturing(cls):
        return cls.capturing_now

    @classmethod
    def warmup(cls, fn, x, n):
        cls.warmups += n
        for _ in range(n):
            fn(x)

    @staticmethod
    def capture(fn, static_in, pool):
        g = FakeGraph(fn, static_in)
        return g, g.out, 1234

    @staticmethod
    def covers(x):
        return x.device.type == "cpu"


def _fn(x):
    return torch.tanh(x) * 2 + x.sum()


def _runner(**kw):
    FakeCuda.capturing_now = False
    FakeCuda.warmups = 0
    return graphs.CUDAGraphRunner(_fn, _backend=FakeCuda, **kw)


def test_replays_read_the_new_input_and_capture_once_per_key():
    r = _runner(warmup=3)
    a, b = torch.randn(2, 5), torch.randn(2, 5)
    assert torch.equal(r(a), _fn(a))
    assert torch.equal(r(b), _fn(b))        # replayed with b copied into the static input
    assert (r.captures, r.replays, FakeCuda.warmups) == (1, 2, 3)
    c = torch.randn(3, 5)                    # another shape: another graph
    assert torch.equal(r(c), _fn(c)) and r.captures == 2
    assert torch.equal(r(a.double()), _fn(a.double())) and r.captures == 3  # another dtype too
    assert set(r.stats()["graphs"].values()) == {1234}


def test_prepare_runs_once_per_new_key_before_the_warmup():
    calls = []

    def prepare(fn, x):
        calls.append((fn, tuple(x.shape), FakeCuda.warmups))
    r = _runner(prepare=prepare)
    a = torch.randn(2, 5)
    r(a)
    r(torch.randn(2, 5))                     # a replay: no prepare
    r(torch.randn(3, 5))                     # a new key
    assert calls == [(_fn, (2, 5), 0), (_fn, (3, 5), 2)]  # before each capture's warm-up runs


def test_the_caller_never_aliases_the_static_buffers():
    r = _runner()
    a, b = torch.randn(4), torch.randn(4)
    want_a = _fn(a)
    ya = r(a)
    a.add_(100)                              # the caller's input is not the static input
    yb = r(b)
    assert torch.equal(ya, want_a)           # a copied output is not overwritten by the next replay
    assert torch.equal(yb, _fn(b))


def test_without_copies_the_output_is_the_static_buffer_overwritten_by_the_next_replay():
    r = _runner(copy_output=False)
    a, b = torch.randn(4), torch.randn(4)
    ya = r(a)
    want_a = _fn(a)
    assert torch.equal(ya, want_a)
    yb = r(b)
    assert yb is ya and torch.equal(ya, _fn(b))  # as the contract says


def test_graphs_are_bounded_least_recently_used_first():
    r = _runner(max_graphs=2)
    x1, x2, x3 = torch.randn(1), torch.randn(2), torch.randn(3)
    r(x1), r(x2), r(x1)                      # x1 used last
    r(x3)                                    # evicts x2
    assert len(r.stats()["graphs"]) == 2 and r.captures == 3
    r(x1)
    assert r.captures == 3                   # still held
    r(x2)
    assert r.captures == 4                   # captured again
    with pytest.raises(ValueError, match="max_graphs"):
        graphs.CUDAGraphRunner(_fn, max_graphs=0)


def test_what_it_does_not_cover_runs_eagerly():
    r = _runner()
    g = torch.randn(3, requires_grad=True)
    assert torch.equal(r(g), _fn(g)) and r.eager_calls == 1
    FakeCuda.capturing_now = True            # inside somebody else's capture
    x = torch.randn(3)
    assert torch.equal(r(x), _fn(x)) and r.eager_calls == 2
    FakeCuda.capturing_now = False
    real = graphs.CUDAGraphRunner(_fn)       # the real CUDA side: CPU tensors are not covered
    assert torch.equal(real(x), _fn(x)) and real.eager_calls == 1 and real.captures == 0


def test_accelerate_installs_and_removes_the_runner():
    m = random_tower(fastvlm.FastViTHDConfig.tiny(), seed=3).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        want = m(x)
    fk.accelerate(m, backend="reference", cuda_graphs=True, max_graphs=3)
    runner = m.__dict__["_fastvlm_graphs"]
    assert m.forward is runner and runner.max_graphs == 3
    with torch.no_grad():
        got = m(x)                           # a CPU input: eager through the runner
    assert runner.eager_calls == 1 and torch.allclose(got, want, rtol=1e-4, atol=1e-5)
    assert "forward" not in "".join(m.state_dict())
    assert runner.prepare is None            # precompiling is for the triton backend's kernels
    fk.accelerate(m, backend="reference")
    assert "forward" not in m.__dict__ and "_fastvlm_graphs" not in m.__dict__


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh runs it)")
def test_real_capture_and_replay_equal_eager_launches():
    m = random_tower(fastvlm.FastViTHDConfig.tiny(), seed=3).eval().cuda()
    fk.accelerate(m, backend="auto")
    xs = [torch.rand(2, 3, 128, 96, device="cuda") for _ in range(3)]
    with torch.no_grad():
        eager = [m(x) for x in xs]
        fk.accelerate(m, backend="auto", cuda_graphs=True)
        replayed = [m(x) for x in xs]
    assert m.__dict__["_fastvlm_graphs"].captures == 1
    for e, r in zip(eager, replayed):
        assert torch.equal(e, r)
