"""Which configuration of ``kernels.CONFIGS`` a launch runs: a table in the repo, no benchmarking.

The table (``tuning.json`` beside this file) maps (arch, dtype, kernel, shape class) to a
configuration. A launch looks its shape class up and runs what the table says, or the kernel's
first configuration where the table has no entry (counted: :func:`misses`). Nothing is benchmarked
on this path, so a first call costs one compilation per kernel variant, a launch inside a CUDA-graph
capture is safe, and every process on the same GPU model runs the same configurations. Every
configuration of a kernel sums in the same order (``kernels.REDUCTION``), so the table changes the
speed of a launch, never its bits.

The shape class of a launch is every shape argument that changes the best tile: the GEMMs' N and K
and a bucket of their M (rows = batch x pixels, so batch 1 and batch 32 are different classes), the
depthwise conv's K, stride, output channels and a bucket of its row width, attention's head size
and a bucket of the token count. :func:`shape_class` is the one definition.

Filling the table:

- ``python -m fastvlm_kernels.triton.tune --rules --write`` fills it from the rules of
  :func:`rule_config` (no GPU: the tile sizes the AOT check compiles spill-free, larger tiles for
  larger M), for every shape FastViTHD produces at 256²..2048², batch 1..64 (``tune.py``);
- on a GPU, ``python -m fastvlm_kernels.triton.tune --measure --write`` times every configuration
  per shape class and writes the fastest (``FASTVLM_TRITON_AUTOTUNE=1`` does the same timing inside
  a process, for its own launches, without writing).
"""
from __future__ import annotations

import functools
import json
import os
import warnings
from contextlib import contextmanager
from typing import Dict, Optional, Tuple

import torch

from . import kernels as K

__all__ = ["TABLE_PATH", "shape_class", "arch_of", "dtype_key", "usable", "choose", "forced", "misses",
           "load_table", "rule_config", "AUTOTUNE"]

TABLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tuning.json")
#: The archs the table has columns for; the interpreter runs sm_90's choices.
ARCHS = ("sm_90", "sm_80")
#: Opt-in timing of every configuration, per shape class, the first time a process meets it.
AUTOTUNE = os.environ.get("FASTVLM_TRITON_AUTOTUNE") == "1"

_DT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def dtype_key(dtype: torch.dtype, prec: Optional[str] = None) -> str:
    """The table column of a launch (fp32, tf32x3, fp16 or bf16): its activation dtype, and for fp32
    the precision of its dots (``PREC``; tf32x3 needs smaller tiles than IEEE fp32, see
    ``kernels.SPILLS``)."""
    dt = _DT.get(dtype, "fp32")
    return "tf32x3" if dt == "fp32" and prec == "tf32x3" else dt


@functools.lru_cache(maxsize=None)  # on every launch's path
def usable(kernel: str, arch: str, dt: str) -> tuple:
    """The configurations of ``kernel`` that column ``dt`` may run on ``arch`` (all of them, less
    those that spill there: ``kernels.SPILLS``); the first is what a shape the table does not list runs."""
    bad = K.spilling(kernel, arch, dt)
    return tuple(c for c in K.CONFIGS[kernel] if c not in bad)


def _bucket(n: int, edges=(256, 1024, 4096, 16384, 65536, 262144)) -> str:
    for e in edges:
        if n <= e:
            return f"<={e}"
    return f">{edges[-1]}"


def shape_class(kernel: str, s: Dict[str, int]) -> str:
    """The table key of a launch of ``kernel`` with shape arguments ``s`` (what launch.py passes)."""
    if kernel == "linear_kernel":
        return f"M{_bucket(s['M'])} N{s['N']} K{s['K']}"
    if kernel == "ffn_fused_kernel":
        return f"M{_bucket(s['M'])} C{s['C']} H{s['HID']}"
    if kernel == "dw_kernel":
        return (f"K{s['K']} S{s['STRIDE']} C{s['Cout']} Wo{_bucket(s['Wo'], (16, 64, 256))}"
                f"{' sums' if s['SUMS'] else ''}")
    if kernel == "attention_kernel":
        return f"N{_bucket(s['N'])} D{s['HEAD_DIM']}"
    if kernel == "stem_kernel":
        return f"M{_bucket(s['M'])} C{s['C']}"
    if kernel == "patch_embed_kernel":
        return f"M{_bucket(s['M'])} C{s['Cout']}"
    return "any"  # se_reduce_kernel, se_expand_kernel, scale_gelu_kernel: one configuration


def arch_of(device: torch.device) -> str:
    """'sm_90' for an H100 / H200, 'sm_80' for an A100; the interpreter (CPU tensors) runs sm_90's
    choices. Other GPUs use the closest column below them (sm_89 -> sm_80)."""
    if device.type != "cuda":
        return "sm_90"
    major, minor = torch.cuda.get_device_capability(device)
    return "sm_90" if major * 10 + minor >= 90 else "sm_80"


_TABLE: Optional[dict] = None


def load_table() -> dict:
    """{arch: {dtype: {kernel: {shape class: configuration dict}}}} from TABLE_PATH, read once; every
    configuration is one of ``kernels.CONFIGS`` (tests/test_triton.py checks)."""
    global _TABLE
    if _TABLE is None:
        try:
            with open(TABLE_PATH) as f:
                _TABLE = json.load(f)
        except FileNotFoundError:
            _TABLE = {}
    return _TABLE


_MISSES: Dict[Tuple[str, str, str, str], int] = {}
_FORCED: Dict[str, dict] = {}
_TUNED: Dict[Tuple[str, str, str, str], dict] = {}


def misses() -> Dict[Tuple[str, str, str, str], int]:
    """{(arch, dtype, kernel, shape class): launches} that the table did not cover (they ran the
    kernel's first configuration)."""
    return dict(_MISSES)


@contextmanager
def forced(kernel: str, config: dict):
    """Run every launch of ``kernel`` with ``config`` (one of kernels.CONFIGS[kernel]) inside the block."""
    if config not in K.CONFIGS[kernel]:
        raise ValueError(f"forced: {config} is not a configuration of {kernel}")
    _FORCED[kernel] = config
    try:
        yield
    finally:
        _FORCED.pop(kernel, None)


def choose(kernel: str, device: torch.device, dtype: torch.dtype, shape: Dict[str, int],
           run=None, prec: Optional[str] = None) -> dict:
    """The configuration a launch of ``kernel`` runs (``prec``: its PREC constexpr, if it has one).
    ``run(config)`` launches it (used only by the opt-in autotuning, which times each configuration
    with it)."""
    if kernel in _FORCED:
        return _FORCED[kernel]
    if len(K.CONFIGS[kernel]) == 1 or (kernel == "dw_kernel" and shape.get("SUMS")):
        return K.CONFIGS[kernel][0]
    arch, dt, cls = arch_of(device), dtype_key(dtype, prec), shape_class(kernel, shape)
    cfgs = usable(kernel, arch, dt)
    key = (arch, dt, kernel, cls)
    if AUTOTUNE and run is not None and device.type == "cuda":
        if key not in _TUNED:
            _TUNED[key] = _time_all(kernel, cfgs, run)
        return _TUNED[key]
    cfg = load_table().get(arch, {}).get(dt, {}).get(kernel, {}).get(cls)
    if cfg is None:
        _MISSES[key] = _MISSES.get(key, 0) + 1
        return cfgs[0]
    return cfg


def tuned() -> Dict[Tuple[str, str, str, str], dict]:
    """What the opt-in autotuning chose in this process (tune.py writes it to the table)."""
    return dict(_TUNED)


def _time_all(kernel, cfgs, run) -> dict:
    if torch.cuda.is_current_stream_capturing():
        warnings.warn(f"fastvlm_kernels.triton: {kernel} met a new shape inside a CUDA-graph capture; it runs "
                      "the table's configuration untimed (warm up before capturing)", RuntimeWarning)
        return cfgs[0]
    from triton.testing import do_bench
    times = [do_bench(lambda c=c: run(c), warmup=5, rep=20) for c in cfgs]
    return cfgs[min(range(len(cfgs)), key=times.__getitem__)]


def rule_config(kernel: str, arch: str, dtype: str, shape: Dict[str, int]) -> dict:
    """The configuration the rules pick where nothing was measured: larger tiles for larger M (more
    reuse, fewer programs), smaller ones where the grid would not fill the GPU's SMs (132 on an
    H100, 108 on an A100). Only :func:`usable` configurations: a rule whose tile spills in this
    column gives way to the next rule."""
    cfgs = usable(kernel, arch, dtype)

    def pick(**want):  # the first usable configuration with these values, or None
        return next((c for c in cfgs if all(c.get(k) == v for k, v in want.items())), None)

    sms = 132 if arch == "sm_90" else 108
    c = None
    if kernel == "linear_kernel":
        M, N = shape["M"], shape["N"]
        c = ((M >= 4096 and N >= 512 and (M // 128) * (N // 128) >= 2 * sms and pick(BLOCK_M=128, BLOCK_N=128))
             or (M >= 4096 and (M // 128) * max(1, N // 64) >= 2 * sms and pick(BLOCK_M=128, BLOCK_N=64))
             or pick(BLOCK_M=64, BLOCK_N=64, num_stages=4 if shape["K"] >= 512 else 3))
    elif kernel == "dw_kernel":
        c = ((shape["Cout"] >= 512 and pick(BLOCK_W=16, BLOCK_C=128))
             or (shape["Wo"] >= 64 and pick(BLOCK_W=16, BLOCK_C=64)))
    elif kernel == "attention_kernel":
        c = shape["N"] >= 2048 and pick(BLOCK_M=128)
    elif kernel == "patch_embed_kernel":
        M, C = shape["M"], shape["Cout"]
        c = ((C >= 256 and (M // 64) * (C // 256) >= 2 * sms and pick(BLOCK_N=256))
             or ((M // 128) * max(1, C // 128) >= 2 * sms and pick(BLOCK_M=128, BLOCK_N=128))
             or ((M // 32) * max(1, C // 128) >= 2 * sms and pick(BLOCK_M=32, BLOCK_N=128)))
    return c or cfgs[0]  # ffn_fused, stem and the rest: the first usable configuration
