"""CUDA-graph replay of an accelerated encoder's forward (docs/gpu.md).

A FastViTHD forward on the triton backend is about 185 kernel launches at 1024²; launched one by
one from Python, their host time (tens of microseconds each) exceeds the GPU time. A CUDA graph
records the launches once and replays them with one call.

    fastvlm_kernels.accelerate(model, cuda_graphs=True)       # every encoder inside model
    runner = fastvlm_kernels.graphs.CUDAGraphRunner(fn)        # any inference function of one tensor

The contract of :class:`CUDAGraphRunner`:

- **Keys.** One graph per (shape, dtype, device) of the input, captured the first time the key is
  seen, after ``warmup`` eager runs on a side stream (they compile the kernels and fill the
  allocator's caches; nothing is benchmarked in a capture, see triton/tuning.py). ``prepare(fn,
  x)``, if given, runs before those (``accelerate`` passes the triton backend's ``precompile``,
  which compiles the forward's kernels several at once).
- **Buffers.** The input is copied into the graph's static input buffer, so the caller's tensor is
  never aliased. The output is a fresh tensor (a copy of the static output) unless the runner was
  built with ``copy_output=False``: then it returns the static output itself, which the next replay
  of the same key overwrites, and the caller must be done with it (or copy it) before that call.
- **Bound.** At most ``max_graphs`` graphs (default 8); the least recently used one is dropped when
  a new key needs room. All graphs of a runner share one memory pool; :meth:`stats` reports what
  each capture added to the memory PyTorch reserved on the device (its cost: the activations of one
  forward at that shape, kept for the replays).
- **Fallback.** Inputs on a CPU (or any non-CUDA device), inputs that require grad, and calls made
  while another capture is in progress run ``fn`` eagerly, unchanged.

``torch.compile(model, mode="reduce-overhead")`` of an accelerated model is the other way to the
same end (the fused ops trace as single nodes; tests/test_triton.py checks there are no graph breaks).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Dict, Optional, Tuple

import torch

__all__ = ["CUDAGraphRunner", "install", "uninstall"]

Key = Tuple[Tuple[int, ...], torch.dtype, torch.device]


class _CudaGraphs:
    """The CUDA side (a seam: the tests substitute a CPU stand-in to check the runner's logic)."""

    @staticmethod
    def pool():
        return torch.cuda.graph_pool_handle()

    @staticmethod
    def capturing() -> bool:
        return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()

    @staticmethod
    def warmup(fn: Callable, x: torch.Tensor, n: int) -> None:
        s = torch.cuda.Stream(device=x.device)
        s.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(s):
            for _ in range(n):
                fn(x)
        torch.cuda.current_stream(x.device).wait_stream(s)

    @staticmethod
    def capture(fn: Callable, static_in: torch.Tensor, pool):
        g = torch.cuda.CUDAGraph()
        torch.cuda.synchronize(static_in.device)
        before = torch.cuda.memory_reserved(static_in.device)
        with torch.cuda.graph(g, pool=pool):
            static_out = fn(static_in)
        torch.cuda.synchronize(static_in.device)
        return g, static_out, torch.cuda.memory_reserved(static_in.device) - before

    @staticmethod
    def covers(x: torch.Tensor) -> bool:
        return x.is_cuda


class _Entry:
    __slots__ = ("graph", "static_in", "static_out", "bytes")

    def __init__(self, graph, static_in, static_out, nbytes):
        self.graph, self.static_in, self.static_out, self.bytes = graph, static_in, static_out, nbytes


class CUDAGraphRunner:
    """``fn(x)`` replayed from CUDA graphs keyed by x's (shape, dtype, device); see the module doc."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], max_graphs: int = 8, warmup: int = 2,
                 copy_output: bool = True, prepare: Optional[Callable] = None, _backend=_CudaGraphs):
        if max_graphs < 1:
            raise ValueError(f"CUDAGraphRunner: max_graphs must be >= 1, got {max_graphs}")
        if warmup < 1:
            raise ValueError(f"CUDAGraphRunner: warmup must be >= 1 (the first run compiles), got {warmup}")
        self.fn, self.max_graphs, self.warmup, self.copy_output = fn, max_graphs, warmup, copy_output
        self.prepare = prepare
        self._b = _backend
        self._graphs: "OrderedDict[Key, _Entry]" = OrderedDict()
        self._pool = None
        self.captures = 0
        self.replays = 0
        self.eager_calls = 0

    @staticmethod
    def key(x: torch.Tensor) -> Key:
        return tuple(x.shape), x.dtype, x.device

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not self._b.covers(x) or x.requires_grad or self._b.capturing():
            self.eager_calls += 1
            return self.fn(x)
        k = self.key(x)
        e = self._graphs.get(k)
        if e is None:
            e = self._capture(k, x)
        else:
            self._graphs.move_to_end(k)
        e.static_in.copy_(x)
        e.graph.replay()
        self.replays += 1
        return e.static_out.clone() if self.copy_output else e.static_out

    def _capture(self, k: Key, x: torch.Tensor) -> _Entry:
        while len(self._graphs) >= self.max_graphs:
            self._graphs.popitem(last=False)
        if self._pool is None:
            self._pool = self._b.pool()
        static_in = torch.empty_like(x, memory_format=torch.contiguous_format).copy_(x)
        with torch.no_grad():
            if self.prepare is not None:
                self.prepare(self.fn, static_in)
            self._b.warmup(self.fn, static_in, self.warmup)
            graph, static_out, nbytes = self._b.capture(self.fn, static_in, self._pool)
        e = self._graphs[k] = _Entry(graph, static_in, static_out, nbytes)
        self.captures += 1
        return e

    def stats(self) -> Dict[str, object]:
        """Graphs held (key -> bytes its capture added to the reserved memory), captures, replays,
        eager calls."""
        return {"graphs": {f"{tuple(k[0])} {str(k[1]).replace('torch.', '')} {k[2]}": e.bytes
                           for k, e in self._graphs.items()},
                "captures": self.captures, "replays": self.replays, "eager_calls": self.eager_calls}

    def clear(self) -> None:
        """Drop every graph (and, with them, the memory they hold)."""
        self._graphs.clear()
        self._pool = None


def install(module: torch.nn.Module, **kw) -> CUDAGraphRunner:
    """Replay ``module``'s forward from CUDA graphs (a :class:`CUDAGraphRunner` over it, set as the
    instance's ``forward``). Installing again replaces the runner; :func:`uninstall` undoes it."""
    uninstall(module)
    runner = CUDAGraphRunner(type(module).forward.__get__(module), **kw)
    module.forward = runner
    module.__dict__["_fastvlm_graphs"] = runner
    return runner


def uninstall(module: torch.nn.Module) -> Optional[CUDAGraphRunner]:
    runner = module.__dict__.pop("_fastvlm_graphs", None)
    if runner is not None:
        runner.clear()
        module.__dict__.pop("forward", None)
    return runner
