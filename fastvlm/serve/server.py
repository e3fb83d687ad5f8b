"""Assembling a server: load the model, accelerate its tower, warm it up, start the engine, run uvicorn.

:class:`ServeOptions` holds everything ``fastvlm serve`` takes; :func:`build_server` turns it into a
:class:`~fastvlm.serve.app.Server` (used by the command line and by each Ray Serve replica alike).
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

from .app import Server
from .engine import Engine
from .protocol import Limits

__all__ = ["ServeOptions", "load_model", "build_server", "serve_forever"]

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: Optional[str]) -> Optional[torch.dtype]:
    """A --dtype name (float32, fp32, bfloat16, bf16, float16, fp16) as a torch dtype; None stays None."""
    if name is None:
        return None
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; one of {', '.join(DTYPES)}")
    return DTYPES[name]


@dataclass
class ServeOptions:
    model: str = "random:tiny"               # checkpoint directory, hub id, or random:{tiny,0.5b,1.5b,7b}
    backend: str = "auto"                    # fused-kernel backend of the vision tower; "none": eager
    dtype: Optional[str] = None              # tower + projector
    llm_dtype: Optional[str] = None          # LLM (default: dtype)
    device: Optional[str] = None
    seed: int = 0                            # random:* weights
    threads: Optional[int] = None            # torch threads (default: torch's)
    served_model_name: Optional[str] = None
    api_key: Optional[str] = None
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 8
    max_queue: int = 64
    max_wait_ms: float = 10.0
    max_encode_batch: int = 16
    warmup: bool = True
    limits: Limits = field(default_factory=Limits)

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ServeOptions":
        d = dict(d)
        lim = d.pop("limits", None) or {}
        return cls(**d, limits=lim if isinstance(lim, Limits) else Limits(**lim))

    def name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        if self.model.startswith("random:"):
            return f"fastvlm-random-{self.model[7:]}"
        return os.path.basename(os.path.normpath(self.model)) or self.model


def _log(msg: str) -> None:
    print(f"[fastvlm] {msg}", file=sys.stderr, flush=True)


def load_model(model: str, backend: str = "auto", dtype: Optional[str] = None, llm_dtype: Optional[str] = None,
               device: Optional[str] = None, seed: int = 0, progress: bool = True):
    """A FastVLM from ``model`` (a checkpoint directory, hub id, or ``random:SIZE``), moved to
    ``device`` and accelerated with ``backend`` ("none" keeps the eager tower)."""
    from ..vlm import FastVLM
    dt, ldt = parse_dtype(dtype), parse_dtype(llm_dtype)
    if model.startswith("random:"):
        if progress:
            _log(f"building a random-weight FastVLM ({model[7:]})")
        vlm = FastVLM.from_config(model[7:], seed=seed)
        if dt is not None or ldt is not None:
            vlm.vision_tower.to(dt or torch.float32)
            vlm.projector.to(dt or torch.float32)
            vlm.language_model.to(ldt or dt or torch.float32)
    else:
        vlm = FastVLM.from_pretrained(model, dtype=dt, llm_dtype=ldt, progress=progress)
    vlm = vlm.to(device) if device else vlm
    if backend != "none":
        import fastvlm_kernels
        t0 = time.perf_counter()
        fastvlm_kernels.accelerate(vlm, backend=backend)
        if progress:
            _log(f"accelerate(backend={backend!r}): {vlm.vision_tower.accelerated_backend} "
                 f"({time.perf_counter() - t0:.2f} s)")
    return vlm


@torch.no_grad()
def _warm_up(vlm) -> None:
    """One image and one short prompt through the model, so the first request does not pay the
    one-time costs (kernel selection, allocator growth)."""
    from ..vlm import IMAGE_TOKEN
    pixels = torch.zeros(1, 3, vlm.image_size, vlm.image_size)
    vlm.generate([pixels[0]], IMAGE_TOKEN + "\nhi", max_new_tokens=2)


def build_server(opts: ServeOptions, progress: bool = True) -> Server:
    if opts.threads:
        torch.set_num_threads(opts.threads)
    t0 = time.perf_counter()
    vlm = load_model(opts.model, opts.backend, opts.dtype, opts.llm_dtype, opts.device, opts.seed, progress)
    if opts.warmup:
        t1 = time.perf_counter()
        _warm_up(vlm)
        if progress:
            _log(f"warm-up: {time.perf_counter() - t1:.2f} s")
    engine = Engine(vlm, max_batch=opts.max_batch, max_queue=opts.max_queue, max_wait_ms=opts.max_wait_ms,
                    max_encode_batch=opts.max_encode_batch, name=opts.name())
    if progress:
        _log(f"model {opts.name()!r} ready in {time.perf_counter() - t0:.1f} s "
             f"({torch.get_num_threads()} threads; batch {opts.max_batch}, queue {opts.max_queue})")
    return Server(engine, opts.name(), opts.limits, opts.api_key)


def serve_forever(opts: ServeOptions) -> None:
    """Load the model and serve it with uvicorn on ``opts.host:opts.port`` until interrupted."""
    import uvicorn
    from .app import create_app
    server = build_server(opts)
    if opts.host not in ("127.0.0.1", "localhost", "::1") and not opts.api_key:
        _log(f"WARNING: listening on {opts.host} without an API key: anyone who can reach this port can use the model")
    _log(f"serving on http://{opts.host}:{opts.port}/v1 (OpenAI chat completions)")
    try:
        uvicorn.run(create_app(server), host=opts.host, port=opts.port, log_level="warning")
    finally:
        server.engine.shutdown()
