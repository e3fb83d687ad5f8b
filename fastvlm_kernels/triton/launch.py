"""Launching the ``triton`` backend's kernels (``kernels.py``), and the building blocks its op
modules (``triton/<op>.py``) share: the depthwise conv, the GEMM with its prologues and epilogues, the
ConvFFN after its dw conv.

CUDA tensors in fp32 / fp16 / bf16 (fp32 accumulation). fp32 GEMMs run on tensor cores as three
TF32 products (tf32x3: each operand split into a TF32 high and low part, the low x low product
dropped), which keeps fp32's accuracy (tests/test_triton.py emulates it under the interpreter:
the tiny encoder's rel-L2 to the float64 model 4.3e-7, against 3.2e-7 with IEEE dots);
``FASTVLM_TRITON_FP32=ieee`` runs them as IEEE fp32 FMAs instead (no tensor cores). With
``TRITON_INTERPRET=1`` the same kernels run on CPU tensors through Triton's interpreter (fp32 / fp16
only: the interpreter has no bf16), which is how CI checks their numerics without a GPU.

Launches are CUDA-graph capturable: no host synchronisation, no data-dependent control flow, output
and scratch buffers from the caching allocator, and configurations from a table (``tuning.py``), not
from benchmarking. Every launch runs on the device of its tensors (whatever the current device is).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import List, Optional

import torch
import triton

from . import INTERPRET
from . import kernels as K
from . import tuning

__all__ = ["INTERPRET", "FFN_FUSED_MAX_C", "FP32_PRECISION", "fp32_precision", "launch_config", "launch", "recording",
           "variants", "precompile", "check_i32"]
#: Widest C the fully fused FFN kernel takes (3 register accumulators of 64 columns); wider FFNs
#: use fc1+GELU -> hidden -> fc2+epilogue (one round trip of the 4C hidden tensor). Measured with
#: the AOT check (python -m fastvlm_kernels.triton.aot): at C = 384 (three 128-column
#: accumulators) every tile tried (BLOCK_M 64/128, BLOCK_K 32/64, BLOCK_H 16/32, 4/8 warps) spilled
#: 64-1752 B of registers on sm_90 and sm_80, so stage 2 takes the split path for now.
FFN_FUSED_MAX_C = 192
#: tl.dot's input_precision for fp32 activations: "tf32x3" (default) or "ieee".
FP32_PRECISION = os.environ.get("FASTVLM_TRITON_FP32", "tf32x3")
if FP32_PRECISION not in ("ieee", "tf32x3"):
    raise ValueError(f"FASTVLM_TRITON_FP32 must be ieee or tf32x3, got {FP32_PRECISION!r}")
_I32_MAX = 2 ** 31 - 1


def check_i32(op: str, **extents: int) -> None:
    """The kernels address these buffers with int32 element offsets: each extent (the number of
    elements addressed, i.e. the largest offset + 1) must be at most 2**31."""
    for name, n in extents.items():
        if n - 1 > _I32_MAX:
            raise ValueError(f"fastvlm triton: {op}'s {name} spans {n} elements, beyond the kernels' int32 "
                             f"offsets (at most {_I32_MAX + 1}); split the batch")


def launch_config(name):
    """The configuration the interpreter runs for a shape the table does not list (the first of
    kernels.CONFIGS[name]), without num_stages."""
    c = dict(K.CONFIGS[name][0])
    c.pop("num_stages")
    return c


_RECORD: Optional[List[dict]] = None


@contextmanager
def recording():
    """Record launches instead of running them (the AOT check and the table's coverage use it to see
    what a forward launches): yields a list of {kernel, config, args, consts, shape}. Outputs are left
    uninitialised."""
    global _RECORD
    prev, _RECORD = _RECORD, []
    try:
        yield _RECORD
    finally:
        _RECORD = prev


def launch(name, grid, *args, shape, dtype, **consts):
    """Run kernel ``name`` with the configuration ``tuning.choose`` picks for ``shape`` (its shape
    class arguments) and activation ``dtype``. ``grid`` maps the tile constexprs to the launch grid."""
    device = next(a.device for a in args if isinstance(a, torch.Tensor))
    kern = K.KERNELS[name]

    def run(cfg):
        cfg = dict(cfg)
        if INTERPRET:
            cfg.pop("num_stages")
        kern[grid(cfg)](*args, **consts, **cfg)

    cfg = tuning.choose(name, device, dtype, shape, run=run, prec=consts.get("PREC"))
    if _RECORD is not None:
        _RECORD.append(dict(kernel=name, config=cfg, args=args, consts=consts, shape=dict(shape), dtype=dtype,
                            grid=grid(cfg), grid_fn=grid))
        return
    run(cfg)


def _specialisation(a):
    """What Triton specialises a launch argument on: a tensor's dtype and 16-byte alignment, an
    integer's being 1 or a multiple of 16 (aot.specialise asks Triton itself; this is for counting)."""
    if isinstance(a, torch.Tensor):
        return str(a.dtype), a.data_ptr() % 16 == 0
    if isinstance(a, bool) or not isinstance(a, int):
        return type(a).__name__
    return a == 1, a % 16 == 0


def variants(records) -> List[dict]:
    """The distinct compilations among recorded launches (``recording``): one record per (kernel,
    argument specialisation, constexprs, configuration)."""
    out, seen = [], set()
    for r in records:
        key = (r["kernel"], tuple(_specialisation(a) for a in r["args"]), repr(sorted(r["consts"].items())),
               repr(sorted(r["config"].items())))
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def precompile(fn, x: torch.Tensor, threads: Optional[int] = None, kernels=None) -> dict:
    """Compile every kernel variant that ``fn(x)`` launches, several at once, before it runs.

    A first forward compiles its variants one after another as it meets them (19 at 1024²; about
    7 s of compiling on one Zen 4 core for sm_90). This runs ``fn(x)`` with its launches recorded
    (nothing computed), then warms up each distinct variant through Triton's ``AsyncCompileMode``
    on ``threads`` threads (default: the CPUs, at most 8): Triton's compiler releases the GIL for
    most of its work (2 threads on 2 cores: 7.1 -> 4.3 s for those 19). Where this Triton has no
    ``AsyncCompileMode``, they are compiled one by one (no gain, no harm). The kernels land in
    Triton's caches, so ``fn(x)`` then launches without compiling. CUDA inputs only; otherwise (the
    interpreter) nothing is done. Returns {"variants", "seconds", "parallel"}.
    ``kernels``: the kernel table to warm (tests pass a stand-in; default ``kernels.KERNELS``)."""
    import time
    kernels = K.KERNELS if kernels is None else kernels
    if not (x.is_cuda or kernels is not K.KERNELS):
        return {"variants": 0, "seconds": 0.0, "parallel": False}
    t0 = time.perf_counter()
    with torch.no_grad(), recording() as rec:
        fn(x)
    todo = variants(rec)
    try:
        from triton.runtime._async_compile import AsyncCompileMode
    except ImportError:  # an older Triton
        AsyncCompileMode = None
    threads = threads or max(1, min(len(os.sched_getaffinity(0)), 8))

    def warm():
        for r in todo:
            kernels[r["kernel"]].warmup(*r["args"], grid=r["grid"], **r["consts"], **r["config"])
    parallel = AsyncCompileMode is not None and threads > 1
    try:
        if parallel:
            from concurrent.futures import ThreadPoolExecutor
            with ThreadPoolExecutor(threads) as ex, AsyncCompileMode(ex):
                warm()
        else:
            warm()
    except Exception as e:  # noqa: BLE001 - an optimisation: the launches compile what is missing
        import warnings
        warnings.warn(f"fastvlm_kernels.triton.precompile: {type(e).__name__}: {e}; the kernels compile on "
                      "first use instead", RuntimeWarning)
        parallel = False
    return {"variants": len(todo), "seconds": time.perf_counter() - t0, "parallel": parallel}


def prec(x):
    return FP32_PRECISION if x.dtype == torch.float32 else "tf32"  # (ignored for fp16 / bf16 operands)


@contextmanager
def fp32_precision(p: str):
    """Launches inside the block run their fp32 dots with precision ``p`` ("ieee" or "tf32x3"),
    whatever FASTVLM_TRITON_FP32 says (for tests, the AOT check and the table's tuning)."""
    global FP32_PRECISION
    if p not in ("ieee", "tf32x3"):
        raise ValueError(f"fp32 precision must be ieee or tf32x3, got {p!r}")
    prev, FP32_PRECISION = FP32_PRECISION, p
    try:
        yield
    finally:
        FP32_PRECISION = prev


def pow2(n, lo=16):
    return max(lo, triton.next_power_of_2(int(n)))


def conv_out(n, k, s, p):
    return (n + 2 * p - k) // s + 1


# --------------------------------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------------------------------
def dw(x, w, b, stride, padding, gelu, sums=False):
    B, H, W, Cin = x.shape
    k, cout = w.shape[0], w.shape[2]
    Ho, Wo = conv_out(H, k, stride, padding), conv_out(W, k, stride, padding)
    y = torch.empty(B, Ho, Wo, cout, device=x.device, dtype=x.dtype)
    part = None
    if B == 0:
        return (y, part) if sums else y
    if sums:
        # one row of partial sums per (output row, BLOCK_W tile); the SUMS launch always takes the
        # first configuration (tuning.choose), whose BLOCK_W fixes the order of the SE's sums
        bw = K.CONFIGS["dw_kernel"][0]["BLOCK_W"]
        part = torch.empty(B, Ho * triton.cdiv(Wo, bw), cout, device=x.device, dtype=torch.float32)
    launch("dw_kernel", lambda m: (B * Ho * triton.cdiv(Wo, m["BLOCK_W"]), triton.cdiv(cout, m["BLOCK_C"])),
           x, w, b if b is not None else w, y, part if part is not None else y, H, W, Cin, Ho, Wo, cout,
           cout // Cin, stride, padding, K=k, HAS_BIAS=b is not None, GELU=gelu, SUMS=sums,
           shape=dict(K=k, STRIDE=stride, Cout=cout, Wo=Wo, SUMS=sums), dtype=x.dtype)
    return (y, part) if sums else y


def linear(a, w, b=None, gelu=False, res=None, gamma=None, ln=None, eps=1e-5, out=None):
    """y = [res + gamma·] act(LN(a) @ w.T + b) for a (M, K) row-major, w (N, K)."""
    M, Kd = a.shape
    N = w.shape[0]
    check_i32("linear", a=M * Kd, y=M * N)
    y = out if out is not None else torch.empty(M, N, device=a.device, dtype=a.dtype)
    if M == 0:
        return y
    lnw, lnb = ln if ln is not None else (w, w)
    launch("linear_kernel", lambda m: (triton.cdiv(M, m["BLOCK_M"]) * triton.cdiv(N, m["BLOCK_N"]),),
           a, w, b if b is not None else w, res if res is not None else a, gamma if gamma is not None else w,
           lnw, lnb, y, M, N, Kd, eps, HAS_BIAS=b is not None, GELU=gelu, RESIDUAL=res is not None,
           LN=ln is not None, PREC=prec(a), shape=dict(M=M, N=N, K=Kd), dtype=a.dtype)
    return y


def ffn_from_t(t, res, fc1_w, fc1_b, fc2_w, fc2_b, gamma):
    """res + gamma·(fc2(GELU(fc1(t))) + b2) over NHWC t, res."""
    B, H, W, C = t.shape
    M, HID = B * H * W, fc1_w.shape[0]
    y = torch.empty(res.shape, device=res.device, dtype=res.dtype)
    if M == 0:
        return y
    t2, r2 = t.reshape(M, C), res.reshape(M, C)  # contiguous: the op's run gets contiguous tensors
    if C <= FFN_FUSED_MAX_C:
        check_i32("convffn", t=M * C)
        bo = pow2(triton.cdiv(C, 3))
        launch("ffn_fused_kernel", lambda m: (triton.cdiv(M, m["BLOCK_M"]),),
               t2, r2, fc1_w, fc1_b, fc2_w, fc2_b, gamma, y, M, C, HID,
               BLOCK_O=bo, NB=triton.cdiv(C, bo), PREC=prec(t), shape=dict(M=M, C=C, HID=HID), dtype=t.dtype)
    else:  # one round trip of the hidden tensor (see FFN_FUSED_MAX_C)
        hid = linear(t2, fc1_w, fc1_b, gelu=True)
        linear(hid, fc2_w, fc2_b, res=r2, gamma=gamma, out=y.view(M, C))
    return y
