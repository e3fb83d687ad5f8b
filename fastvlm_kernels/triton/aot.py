"""Ahead-of-time compilation of what the triton backend launches, for NVIDIA targets, on any
machine (no GPU needed; docs/gpu.md).

    python -m fastvlm_kernels.triton.aot [--dtypes fp32,tf32x3,fp16,bf16] [--archs 90,80] [--json out.json]

What runs: FastViTHD's launches at 512², 1024² and 2048² (batch 1 and 8) are recorded
(``tune.fastvithd_launches``, nothing computed), each specialised as the runtime would specialise it
(Triton's own rules: integer arguments equal to 1 become constants, multiples of 16 and 16-byte
aligned pointers get the divisibility attribute), and every distinct (kernel, specialisation) is
compiled with every configuration the table (``tuning.json``) gives that kernel for that arch and
dtype, for ``GPUTarget("cuda", arch, 32)``. Then Triton's bundled ``cuobjdump -res-usage`` reads the
cubin's registers and stack (spills), and the kernel metadata its shared memory; the PTX says whether
tensor cores are used (``mma``) and whether through Hopper's ``wgmma``.
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
#: The (size, batch) forwards whose launches are compiled.
FORWARDS = ((512, 1), (1024, 1), (2048, 1), (1024, 8))


def specialise(kernel: str, args, consts) -> Dict:
    """The (signature, constexprs, attrs) the runtime compiles a launch of ``kernel`` with (the
    configuration's constexprs excluded), from Triton's own specialisation of each argument."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl
    fn = K.KERNELS[kernel]
    sig, constexprs, attrs, ones = {}, {}, {}, []
    for i, p in enumerate(fn.params):
        name = p.name
        if p.is_constexpr:
            if name in consts:
                sig[name] = "constexpr"
                constexprs[name] = consts[name]
            continue  # a configuration constexpr: filled per configuration
        v = args[i]
        ty, attr = native_specialize_impl(BaseBackend, v, p.is_const, not p.do_not_specialize,
                                          not p.do_not_specialize_on_alignment)[:2]
        if ty == "constexpr":
            sig[name] = "constexpr"
            constexprs[name] = attr if attr is not None else v
            ones.append(name)
        else:
            sig[name] = ty
            if isinstance(attr, str) and "D" in attr:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return dict(signature=sig, constexprs=constexprs, attrs=attrs, ones=ones)


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def compile_one(kernel: str, spec: Dict, cfg: Dict, arch: int, dtype: str, excluded: bool = False) -> Dict:
    """Compile one launch; ``excluded``: a tile the table's column never runs because it spills
    (``kernels.SPILLS``), compiled to check that the list is still true."""
    cfg = dict(cfg)
    num_warps, num_stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    fn = K.KERNELS[kernel]
    sig = dict(spec["signature"])
    consts = dict(spec["constexprs"], **cfg)
    for k in cfg:
        sig[k] = "constexpr"
    sig = {a: sig[a] for a in fn.arg_names}
    variant = {k: v for k, v in spec["constexprs"].items() if k not in spec["ones"]}
    divisible = sorted(fn.arg_names[i[0]] for i in spec["attrs"])
    rec = {"kernel": kernel, "config": cfg, "variant": variant, "divisible": divisible, "ones": spec["ones"],
           "arch": f"sm_{arch}", "dtype": dtype, "num_warps": num_warps, "num_stages": num_stages, "excluded": excluded,
           "triton": triton.__version__}
    try:
        ck = triton.compile(ASTSource(fn, sig, consts, spec["attrs"]), target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages})
    except Exception as e:  # noqa: BLE001 - reported per configuration
        rec.update(ok=False, error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        return rec
    ptx = ck.asm["ptx"]
    rec.update(ok=True, shared=int(ck.metadata.shared), wgmma="wgmma" in ptx, tensor_cores="mma" in ptx)
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


def plan(archs=(90, 80), dtypes=("fp32", "tf32x3", "fp16", "bf16"), forwards=FORWARDS) -> List[tuple]:
    """[(kernel, specialisation, configuration, arch, dtype, excluded)]: every distinct specialisation
    FastViTHD's forwards launch, with every configuration the table gives its kernel (for that arch
    and dtype; the first usable configuration too: the one a shape the table does not list runs);
    and the tiles ``kernels.SPILLS`` excludes from that column (``excluded`` True)."""
    from . import tune, tuning
    table = tuning.load_table()
    jobs, seen = [], set()
    for dt in dtypes:
        enc = tune._encoder(tune.DTYPES[dt])
        specs = {}
        for size, batch in forwards:
            with tune.precision(dt):
                launches = tune.fastvithd_launches([size], batch, tune.DTYPES[dt], enc=enc)
            for r in launches:
                spec = specialise(r["kernel"], r["args"], r["consts"])
                key = (r["kernel"], repr(sorted(spec["signature"].items())), repr(sorted(spec["constexprs"].items())),
                       repr(sorted(spec["attrs"])))
                specs.setdefault(key, (r["kernel"], spec))
        for kernel, spec in specs.values():
            for arch in archs:
                cfgs = ([tuning.usable(kernel, f"sm_{arch}", dt)[0]]
                        + list(table.get(f"sm_{arch}", {}).get(dt, {}).get(kernel, {}).values()))
                for cfg in cfgs:
                    k = (kernel, repr(spec), repr(sorted(cfg.items())), arch, dt)
                    if k not in seen:
                        seen.add(k)
                        jobs.append((kernel, spec, cfg, arch, dt, False))
                for cfg in K.spilling(kernel, f"sm_{arch}", dt):
                    jobs.append((kernel, spec, cfg, arch, dt, True))
    return jobs


def _job(job):
    return compile_one(*job)


def compile_all(archs=(90, 80), dtypes=("fp32", "tf32x3", "fp16", "bf16"), progress=False, workers=None) -> List[Dict]:
    jobs = plan(archs, dtypes)
    workers = workers or max(1, min(len(os.sched_getaffinity(0)), 8))
    out = []
    if workers > 1:
        import multiprocessing as mp
        with mp.get_context("spawn").Pool(workers) as pool:
            for rec in pool.imap(_job, jobs, chunksize=4):
                out.append(rec)
                if progress:
                    print(_line(rec), file=sys.stderr, flush=True)
    else:
        for job in jobs:
            out.append(compile_one(*job))
            if progress:
                print(_line(out[-1]), file=sys.stderr, flush=True)
    return out


def _line(r: Dict) -> str:
    cfg = ",".join(f"{k}={v}" for k, v in r["config"].items())
    var = ",".join(f"{k}={v}" for k, v in r["variant"].items()) + f" div16:{len(r['divisible'])}" + (
        f" ones:{','.join(r['ones'])}" if r["ones"] else "")
    if not r["ok"]:
        return f"{r['kernel']:<20} {r['arch']} {r['dtype']:<6} [{cfg} w{r['num_warps']} s{r['num_stages']}] [{var}] FAILED {r['error']}"
    return (f"{r['kernel']:<20} {r['arch']} {r['dtype']:<6} [{cfg} w{r['num_warps']} s{r['num_stages']}] [{var}] "
            f"smem {r['shared']:>6} B regs {r['registers']:>3} stack {r['stack']} B "
            f"{'wgmma' if r['wgmma'] else 'mma' if r['tensor_cores'] else 'fma'}{' (excluded: spills)' if r.get('excluded') else ''}")


def main(argv=None) -> int:
    import argparse
    import json
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", default="fp32,tf32x3,fp16,bf16",
                    help="comma-separated: fp32, tf32x3 (fp32 with tf32x3 dots), fp16, bf16 (default all)")
    ap.add_argument("--archs", default="90,80", help="comma-separated compute capabilities (default 90,80)")
    ap.add_argument("--json", default=None, help="also write the records to this file")
    ap.add_argument("--workers", type=int, default=None, help="compiler processes (default: the CPUs, at most 8)")
    a = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: interpreted kernels cannot be compiled", file=sys.stderr)
        return 2
    recs = compile_all(archs=tuple(int(x) for x in a.archs.split(",")), dtypes=tuple(a.dtypes.split(",")),
                       progress=True, workers=a.workers)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(recs, f, indent=1)
    runs = [r for r in recs if not r["excluded"]]
    bad = [r for r in runs if not r["ok"] or r["spills"] or not r["fits_smem"]]
    print(f"{len(runs)} compiled, {len(bad)} with errors, spills or too much shared memory; "
          f"{sum(r.get('wgmma', False) for r in runs)} use wgmma", file=sys.stderr)
    ex = [r for r in recs if r["excluded"]]
    if ex:
        print(f"{len(ex)} more: the tiles kernels.SPILLS excludes, {sum(r.get('spills', False) for r in ex)} of "
              f"them spill under this Triton ({triton.__version__})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
