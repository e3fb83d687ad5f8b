"""Fill the triton backend's configuration table (``tuning.json``; see ``tuning.py``).

    python -m fastvlm_kernels.triton.tune --rules --write              # no GPU: the rules' choices
    python -m fastvlm_kernels.triton.tune --measure --write            # on a GPU: the fastest, timed
    python -m fastvlm_kernels.triton.tune --check                      # does the table cover FastViTHD?

The shapes are the launches FastViTHD makes at square images of 256..2048 pixels (every multiple of
64) and batch 1..64, for each column of the table (fp32 with IEEE dots, fp32 with tf32x3 dots, fp16,
bf16): :func:`fastvithd_launches` records them by running the default-config encoder with the
launches recorded instead of run (``launch.recording``: nothing is computed, so this needs no GPU). ``--measure`` times each configuration with CUDA events on the
current GPU, for the classes met at the sizes given by ``--measure-sizes`` (default 512, 1024 at
batch 1 and 1024 at batch 32), and writes its arch's column; the rules fill what it did not measure.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from typing import Dict, Iterable, List, Tuple

import torch

from . import kernels as K
from . import tuning

SIZES = tuple(range(256, 2048 + 1, 64))
BATCHES = tuple(range(1, 65))
#: The table's columns and the activation dtype of each: "tf32x3" is fp32 with tf32x3 dots.
DTYPES = {"fp32": torch.float32, "tf32x3": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def precision(dt: str):
    """The fp32 dot precision column ``dt`` records and runs with (a no-op for fp16 / bf16)."""
    from .launch import fp32_precision
    return fp32_precision("tf32x3" if dt == "tf32x3" else "ieee")


def _encoder(dtype: torch.dtype):
    """The default-config FastViTHD, accelerated for the triton backend (weights random: only shapes
    matter here). Built without CUDA: the backend's kernels are registered directly."""
    import fastvlm
    from ..accelerate import _swap
    from . import _load
    _load()
    enc = fastvlm.FastViTHD(fastvlm.FastViTHDConfig(), inference_mode=True).eval()
    with torch.no_grad():
        _swap(enc, "triton", dtype)
    return enc


def fastvithd_launches(sizes: Iterable[int] = SIZES, batch: int = 1, dtype: torch.dtype = torch.float32,
                       enc=None) -> List[dict]:
    """The launches (launch.recording's records) of one FastViTHD forward per square size, at ``batch``."""
    from .launch import recording
    enc = enc if enc is not None else _encoder(dtype)
    out = []
    with torch.no_grad(), recording() as rec:
        for s in sizes:
            enc(torch.empty(batch, 3, s, s, dtype=dtype))
            out.extend(rec)
            rec.clear()
    return out


def _scaled(shape: Dict[str, int], batch: int) -> Dict[str, int]:
    """A batch-1 launch's shape at ``batch``: M (rows = batch x pixels) scales, the rest does not."""
    return {k: v * batch if k == "M" else v for k, v in shape.items()}


def classes(dtypes=tuple(DTYPES), sizes=SIZES, batches=BATCHES) -> Dict[Tuple[str, str, str], Dict[str, int]]:
    """{(dtype, kernel, shape class): one shape of that class} over FastViTHD's sizes and batches."""
    out = {}
    for dt in dtypes:
        enc = _encoder(DTYPES[dt])
        with precision(dt):
            launches = fastvithd_launches(sizes, 1, DTYPES[dt], enc=enc)
        for r in launches:
            if len(K.CONFIGS[r["kernel"]]) == 1 or (r["kernel"] == "dw_kernel" and r["shape"].get("SUMS")):
                continue  # one configuration: nothing to choose
            for b in batches:
                s = _scaled(r["shape"], b)
                out.setdefault((dt, r["kernel"], tuning.shape_class(r["kernel"], s)), s)
    return out


def rules_table(archs=tuning.ARCHS, **kw) -> dict:
    table: dict = {}
    for (dt, kernel, cls), shape in sorted(classes(**kw).items()):
        for arch in archs:
            cfg = tuning.rule_config(kernel, arch, dt, shape)
            table.setdefault(arch, {}).setdefault(dt, {}).setdefault(kernel, {})[cls] = cfg
    return table


def uncovered(table: dict, archs=tuning.ARCHS, **kw) -> List[Tuple[str, str, str, str]]:
    """The (arch, dtype, kernel, class) keys FastViTHD meets that ``table`` has no entry for, or whose
    entry is not one of the configurations that column may run (``tuning.usable``)."""
    bad = []
    for (dt, kernel, cls) in classes(**kw):
        for arch in archs:
            cfg = table.get(arch, {}).get(dt, {}).get(kernel, {}).get(cls)
            if cfg is None or cfg not in tuning.usable(kernel, arch, dt):
                bad.append((arch, dt, kernel, cls))
    return bad


def measure(sizes_batches=((512, 1), (1024, 1), (1024, 32)), dtypes=tuple(DTYPES)) -> dict:
    """Time every configuration of every launch FastViTHD makes at ``sizes_batches`` on this GPU
    (CUDA events, median of 20 after 5 warm-up runs); {dtype: {kernel: {class: fastest config}}}."""
    from triton.testing import do_bench
    from .launch import recording
    if not torch.cuda.is_available():
        raise SystemExit("tune --measure needs a CUDA GPU")
    out: dict = {}
    arch = tuning.arch_of(torch.device("cuda"))
    for dt in dtypes:
        enc = _encoder(DTYPES[dt]).cuda()
        for size, batch in sizes_batches:
            x = torch.rand(batch, 3, size, size, device="cuda", dtype=DTYPES[dt])
            with torch.no_grad(), recording() as rec, precision(dt):
                enc(x)
            for r in rec:
                kernel = r["kernel"]
                cfgs = tuning.usable(kernel, arch, dt)
                if len(cfgs) == 1 or (kernel == "dw_kernel" and r["shape"].get("SUMS")):
                    continue
                cls = tuning.shape_class(kernel, r["shape"])
                if cls in out.get(dt, {}).get(kernel, {}):
                    continue
                times = []
                for c in cfgs:
                    def go(c=c):
                        cfg = dict(c)
                        K.KERNELS[kernel][r["grid_fn"](cfg)](*r["args"], **r["consts"], **cfg)
                    times.append(do_bench(go, warmup=5, rep=20))
                best = min(range(len(cfgs)), key=times.__getitem__)
                out.setdefault(dt, {}).setdefault(kernel, {})[cls] = cfgs[best]
                print(f"{dt} {kernel:<20} {cls:<28} " + " ".join(f"{t * 1e3:8.1f}" for t in times)
                      + f"  us -> #{best}", file=sys.stderr, flush=True)
    return out


def dumps(table: dict) -> str:
    """The table as JSON, one shape class per line (readable diffs)."""
    out = ["{"]
    archs = sorted(table)
    for i, arch in enumerate(archs):
        out.append(f" {json.dumps(arch)}: {{")
        dts = sorted(table[arch])
        for j, dt in enumerate(dts):
            out.append(f"  {json.dumps(dt)}: {{")
            kernels = sorted(table[arch][dt])
            for k, kernel in enumerate(kernels):
                out.append(f"   {json.dumps(kernel)}: {{")
                entries = sorted(table[arch][dt][kernel].items())
                for n, (cls, cfg) in enumerate(entries):
                    out.append(f"    {json.dumps(cls)}: {json.dumps(cfg, sort_keys=True)}"
                               + ("," if n < len(entries) - 1 else ""))
                out.append("   }" + ("," if k < len(kernels) - 1 else ""))
            out.append("  }" + ("," if j < len(dts) - 1 else ""))
        out.append(" }" + ("," if i < len(archs) - 1 else ""))
    out.append("}")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--rules", action="store_true", help="fill the table from the rules (no GPU needed)")
    g.add_argument("--measure", action="store_true", help="time every configuration on this GPU")
    g.add_argument("--check", action="store_true", help="list the shape classes the table does not cover")
    ap.add_argument("--write", action="store_true", help=f"write the table ({tuning.TABLE_PATH})")
    ap.add_argument("--out", default=None, help="write the table here instead")
    a = ap.parse_args(argv)
    if a.check:
        bad = uncovered(tuning.load_table())
        for k in bad:
            print(" ".join(k))
        print(f"{len(bad)} shape classes not covered", file=sys.stderr)
        return 1 if bad else 0
    table = rules_table()
    if a.measure:
        arch = tuning.arch_of(torch.device("cuda"))
        table = copy.deepcopy(tuning.load_table()) or table
        for dt, kernels in measure().items():
            for kernel, entries in kernels.items():
                table.setdefault(arch, {}).setdefault(dt, {}).setdefault(kernel, {}).update(entries)
    path = a.out or (tuning.TABLE_PATH if a.write else None)
    text = dumps(table)
    if path:
        with open(path, "w") as f:
            f.write(text)
        print(f"wrote {path}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
