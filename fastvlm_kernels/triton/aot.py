"""Ahead-of-time compilation of every Triton kernel x configuration for NVIDIA targets, on any
machine (no GPU needed; docs/gpu.md).

    python -m fastvlm_kernels.triton.aot [--dtypes bf16,fp32] [--json out.json]   # one line per kernel x config x arch

For each (kernel, configuration in ``kernels.CONFIGS``, arch, dtype) it runs ``triton.compile`` for
``GPUTarget("cuda", arch, 32)`` with FastViTHD's shapes as the shape-dependent constexprs, then
Triton's bundled ``cuobjdump -res-usage`` on the cubin for registers and stack (spills), and reads the
shared memory from the kernel metadata and whether the PTX uses Hopper's ``wgmma``.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from typing import Dict, List

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import kernels as K

#: Kernels allowed to spill registers (none now). The AOT test fails if any other kernel spills,
#: or if a listed one stops spilling (the list would be stale).
KNOWN_SPILLS = ()

#: Shared memory per block a kernel may use (opt-in maximum), bytes.
SMEM_LIMIT = {90: 232448, 80: 166912}

_P, _I, _F = "ptr", "i32", "fp32"
# argument kinds per kernel (ptr: the activation dtype unless listed in _F32_PTRS), in order
_ARGS = {
    "dw_kernel": dict(x_ptr=_P, w_ptr=_P, b_ptr=_P, y_ptr=_P, sum_ptr="*fp32", H=_I, W=_I, Cin=_I, Ho=_I, Wo=_I,
                      Cout=_I, MULT=_I, STRIDE=_I, PAD=_I),
    "ffn_fused_kernel": dict(t_ptr=_P, res_ptr=_P, w1_ptr=_P, b1_ptr=_P, w2_ptr=_P, b2_ptr=_P, g_ptr=_P, y_ptr=_P,
                             M=_I, C=_I, HID=_I),
    "linear_kernel": dict(a_ptr=_P, w_ptr=_P, b_ptr=_P, res_ptr=_P, g_ptr=_P, lnw_ptr=_P, lnb_ptr=_P, y_ptr=_P,
                          M=_I, N=_I, K=_I, eps=_F),
    "attention_kernel": dict(qkv_ptr=_P, o_ptr=_P, N=_I, C=_I, HEADS=_I, HEAD_DIM=_I, scale=_F),
    "stem_kernel": dict(x_ptr=_P, w0_ptr=_P, b0_ptr=_P, w1_ptr=_P, b1_ptr=_P, w2_ptr=_P, b2_ptr=_P, y_ptr=_P,
                        H=_I, W=_I, H1=_I, W1=_I, Ho=_I, Wo=_I, C=_I, M=_I),
    "patch_embed_kernel": dict(x_ptr=_P, dw_ptr=_P, dwb_ptr=_P, w_ptr=_P, b_ptr=_P, y_ptr=_P, H=_I, W=_I, Cin=_I,
                               Ho=_I, Wo=_I, Cout=_I, M=_I),
    "se_kernel": dict(sum_ptr="*fp32", wr_ptr=_P, br_ptr=_P, we_ptr=_P, be_ptr=_P, s_ptr="*fp32", P=_I, C=_I, RD=_I,
                      inv_hw=_F),
    "scale_gelu_kernel": dict(y_ptr=_P, s_ptr="*fp32", HWC=_I, C=_I),
}

# Shape-dependent constexprs at FastViTHD's shapes; a kernel compiled once per variant listed.
_VARIANTS = {
    "dw_kernel": [dict(K=7, HAS_BIAS=True, GELU=False, SUMS=False), dict(K=3, HAS_BIAS=True, GELU=False, SUMS=True)],
    "ffn_fused_kernel": [dict(BLOCK_O=64, NB=3), dict(BLOCK_O=32, NB=3)],           # C = 192 and 96
    "linear_kernel": [dict(HAS_BIAS=True, GELU=True, RESIDUAL=False, LN=False),        # fc1 + GELU
                      dict(HAS_BIAS=True, GELU=False, RESIDUAL=True, LN=False),        # fc2 / proj epilogue
                      dict(HAS_BIAS=False, GELU=False, RESIDUAL=False, LN=True)],      # LN + qkv
    "attention_kernel": [dict(HDP=32)],
    "stem_kernel": [dict(CIN=3, CP=128)],
    "patch_embed_kernel": [dict(K=7)],
    "se_kernel": [dict(RDP=256)],
    "scale_gelu_kernel": [dict()],
}
_TYPES = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def compile_one(name: str, cfg: Dict, variant: Dict, arch: int, dtype: str) -> Dict:
    cfg = dict(cfg)
    num_warps, num_stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    consts = dict(variant, **cfg)
    fn = K.KERNELS[name]
    if "PREC" in fn.arg_names:
        consts["PREC"] = "ieee" if dtype == "fp32" else "tf32"
    sig = {}
    for a in fn.arg_names:
        if a in consts:
            sig[a] = "constexpr"
        else:
            kind = _ARGS[name][a]
            sig[a] = _TYPES[dtype] if kind == _P else kind
    rec = {"kernel": name, "config": cfg, "variant": variant, "arch": f"sm_{arch}", "dtype": dtype,
           "num_warps": num_warps, "num_stages": num_stages}
    try:
        ck = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages})
    except Exception as e:  # noqa: BLE001 - reported per configuration
        rec.update(ok=False, error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        return rec
    ptx = ck.asm["ptx"]
    rec.update(ok=True, shared=int(ck.metadata.shared), wgmma="wgmma" in ptx)
    # Resource usage of the cubin Triton built (its own ptxas run): registers, and the stack frame,
    # which in Triton kernels (no local arrays) is register spilling.
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "k.cubin")
        with open(p, "wb") as f:
            f.write(ck.asm["cubin"])
        r = subprocess.run([_tool("cuobjdump"), "-res-usage", p], capture_output=True, text=True)
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", r.stdout)
    rec.update(registers=int(m.group(1)) if m else -1, stack=int(m.group(2)) if m else -1,
               local=int(m.group(4)) if m else -1)
    rec["spills"] = rec["stack"] != 0 or rec["local"] != 0
    rec["fits_smem"] = rec["shared"] <= SMEM_LIMIT[arch]
    return rec


def compile_all(archs=(90, 80), dtypes=("bf16",), kernels=None, progress=False) -> List[Dict]:
    out = []
    for name in kernels or K.KERNELS:
        for variant in _VARIANTS[name]:
            for cfg in K.CONFIGS[name]:
                for arch in archs:
                    for dt in dtypes:
                        rec = compile_one(name, cfg, variant, arch, dt)
                        out.append(rec)
                        if progress:
                            print(_line(rec), file=sys.stderr, flush=True)
    return out


def _line(r: Dict) -> str:
    cfg = ",".join(f"{k}={v}" for k, v in r["config"].items())
    var = ",".join(f"{k}={v}" for k, v in r["variant"].items())
    if not r["ok"]:
        return f"{r['kernel']:<20} {r['arch']} {r['dtype']:<4} [{cfg} w{r['num_warps']} s{r['num_stages']}] [{var}] FAILED {r['error']}"
    return (f"{r['kernel']:<20} {r['arch']} {r['dtype']:<4} [{cfg} w{r['num_warps']} s{r['num_stages']}] [{var}] "
            f"smem {r['shared']:>6} B regs {r['registers']:>3} stack {r['stack']} B "
            f"{'wgmma' if r['wgmma'] else 'mma/fma'}")


def main(argv=None) -> int:
    import argparse
    import json
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", default="bf16", help="comma-separated: bf16, fp16, fp32 (default bf16)")
    ap.add_argument("--archs", default="90,80", help="comma-separated compute capabilities (default 90,80)")
    ap.add_argument("--json", default=None, help="also write the records to this file")
    a = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: interpreted kernels cannot be compiled", file=sys.stderr)
        return 2
    recs = compile_all(archs=tuple(int(x) for x in a.archs.split(",")), dtypes=tuple(a.dtypes.split(",")),
                       progress=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(recs, f, indent=1)
    bad = [r for r in recs if not r["ok"] or r["spills"] or not r["fits_smem"]]
    print(f"{len(recs)} compiled, {len(bad)} with errors, spills or too much shared memory; "
          f"{sum(r.get('wgmma', False) for r in recs)} use wgmma", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
