"""A/B of builds of the C++ extension: whole-model forwards in alternating processes.

    python -m bench.ab old=/tmp/old/_C.so new=fastvlm_kernels/_C.cpython-311-x86_64-linux-gnu.so
    python -m bench.ab A.so B.so --size 512 --pairs 6 --forwards 3 --threads 2 --dtype bf16

Two builds of ``fastvlm_kernels._C`` cannot live in one process (they register the same ops), so
this is the measurement for "did this kernel change make the model faster": each process loads one
build (``FASTVLM_EXT``), builds the same random-weight FastViTHD (``fastvlm.testing.random_tower``,
fixed seed), accelerates it with the ``cpu`` backend, runs one warm-up forward and then
``--forwards`` timed ones. Processes alternate between the builds in ABAB... order, reversed every
other pair (AB BA AB ...), so a drift of the machine's speed over minutes hits both alike. It
reports every time, each build's median and mean, the ratio of the medians, and whether the builds'
outputs are bitwise identical (a SHA-256 of the output tokens) -- the check behind a "bitwise
identical" claim. Then, per build against the first, the ratios within each pair (one process of
each, back to back, so a drift over minutes mostly cancels): their median and range, in how many
pairs the build was faster, and a bootstrap 90% interval of the median ratio (pairs resampled, fixed
seed). An interval that contains 1.000 means the run did not tell the builds apart. On a noisy shared machine (this project's 2-vCPU CI machine drifts by +-15% over
minutes) prefer more pairs over more forwards per process.

``--op CASE`` compares one fused op instead of the whole model: a case of the per-op microbenchmarks
(``bench/test_ops_bench.py``, e.g. ``--op "conv_exp 16x16x1536"``), its ``cpu``-backend module called
``--calls`` times per process (one warm-up first); each process contributes the median of its calls.

    python -m bench.ab old=/tmp/old/_C.so new=fastvlm_kernels/_C.cpython-311-x86_64-linux-gnu.so \
        --op "conv_exp 16x16x1536" --pairs 8 --calls 300

For ops whose output or scratch is megabytes, ``--steady-malloc`` keeps glibc from handing pages
back to the OS between calls (see STEADY_MALLOC): what is compared is then the kernels, not where
the allocator's heap top happened to fall in each process.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Tuple

# Both child programs end in the same loop: warm-up call, `n` timed calls, then one JSON line.
_TIMED = r"""
def timed(fn, x, n, keep_all):
    with torch.no_grad():
        y = fn(x)
        times = []
        for _ in range(n):
            t = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t)
    times = times if keep_all else [sorted(times)[n // 2]]  # all forwards, or the median call
    digest = hashlib.sha256(y.float().contiguous().numpy().tobytes()).hexdigest()
    print(json.dumps({"times": times, "sha256": digest, "isa": fastvlm_kernels.cpu.cpu_isa(),
                      "steady_malloc": "MALLOC_TRIM_THRESHOLD_" in __import__("os").environ}))
"""

_CHILD = r"""
import hashlib, json, sys, time, torch
import fastvlm_kernels
from fastvlm.testing import random_tower
size, forwards, threads, dtype, tiny = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5] == "1"
assert fastvlm_kernels.extension_available(), fastvlm_kernels.extension_error()
torch.set_num_threads(threads)
dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
cfg = None
if tiny:
    from fastvlm import FastViTHDConfig
    cfg = FastViTHDConfig.tiny()
m = random_tower(cfg, seed=0)
fastvlm_kernels.accelerate(m, backend="cpu", dtype=dt)
x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(1)).to(dt)
""" + _TIMED + "timed(m, x, forwards, True)\n"

# --op: one case of bench/test_ops_bench.py (imported from the repository root, the child's cwd).
_CHILD_OP = r"""
import hashlib, json, os, sys, time, torch
case, calls, threads, dtype = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
os.environ["FASTVLM_BENCH_DTYPE"] = dtype
import fastvlm_kernels
assert fastvlm_kernels.extension_available(), fastvlm_kernels.extension_error()
torch.set_num_threads(threads)
from bench.test_ops_bench import CASES, DTYPE
torch.manual_seed(0)  # the cases draw their inputs from the global generator
_, factory, x_nchw, x_nhwc, _, _ = CASES[case]()
x = (x_nchw if case.startswith("stem") else x_nhwc).to(DTYPE)
""" + _TIMED + "timed(factory('cpu'), x, calls, False)\n"
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _parse_build(spec: str, i: int) -> Tuple[str, str]:
    label, sep, path = spec.partition("=")
    if not sep:
        label, path = chr(ord("A") + i), spec
    if not os.path.isfile(path):
        raise SystemExit(f"bench.ab: no such extension build: {path!r}")
    return label, os.path.abspath(path)


# --steady-malloc: glibc's malloc with its heap never trimmed and nothing mmapped per block, so every
# call reuses pages already mapped. Without it, whether an op's output or scratch comes back on fresh
# pages (minor faults, zeroed by the kernel) changes from process to process: one build of
# patch_embed 1 measured 1.17x in one bench.ab run and 1.01x in the next against the same base, with
# 0 to 1681 page faults per call in processes of the same build.
STEADY_MALLOC = {"MALLOC_TRIM_THRESHOLD_": "2000000000", "MALLOC_MMAP_THRESHOLD_": "1000000000",
                 "MALLOC_TOP_PAD_": "100000000"}


def pair_stats(ratios: List[float], resamples: int = 2000, seed: int = 0) -> Dict[str, float]:
    """Summary of per-pair time ratios (build / base): median, min, max, the count below 1 (build
    faster), and a percentile-bootstrap 90% interval of the median (pairs drawn with replacement,
    `resamples` times, a fixed seed so a report is reproducible from its JSON)."""
    if not ratios:
        raise ValueError("pair_stats: no ratios")
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(resamples))
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
            "faster": sum(r < 1 for r in ratios), "pairs": len(ratios),
            "lo90": meds[int(0.05 * (resamples - 1))], "hi90": meds[int(0.95 * (resamples - 1))]}


def run_one(path: str, args) -> Dict:
    env = dict(os.environ, FASTVLM_EXT=path, **(STEADY_MALLOC if args.steady_malloc else {}))
    if args.op:
        cmd = [sys.executable, "-c", _CHILD_OP, args.op, str(args.calls), str(args.threads), args.dtype]
    else:
        cmd = [sys.executable, "-c", _CHILD, str(args.size), str(args.forwards), str(args.threads), args.dtype,
               "1" if args.tiny else "0"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=_ROOT)
    if out.returncode != 0:
        raise SystemExit(f"bench.ab: the run with {path} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("builds", nargs="+", help="extension builds (_C*.so), each PATH or LABEL=PATH; two or more")
    p.add_argument("--size", type=int, help="square input size (default 1024)")
    p.add_argument("--pairs", type=int, default=4, help="rounds of one process per build (default 4)")
    p.add_argument("--forwards", type=int, help="timed forwards per process (default 3)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--tiny", action="store_true", help="FastViTHDConfig.tiny() instead of the released shapes")
    p.add_argument("--op", help='one per-op microbenchmark case instead of the model, e.g. "conv_exp 16x16x1536"')
    p.add_argument("--calls", type=int, default=100, help="with --op: timed calls per process (default 100)")
    p.add_argument("--steady-malloc", action="store_true",
                   help="run the processes with glibc malloc's trimming and per-block mmap off (MALLOC_* "
                        "variables), so fresh-page faults do not swing the small ops' times between processes")
    p.add_argument("--json", help="also write everything to this file")
    args = p.parse_args(argv)
    if len(args.builds) < 2:
        p.error("give at least two builds to compare")
    if args.op and (args.size is not None or args.forwards is not None or args.tiny):
        p.error("--op times one op at its FastViTHD shapes: --size, --forwards and --tiny are for whole-model runs")
    args.size = 1024 if args.size is None else args.size
    args.forwards = 3 if args.forwards is None else args.forwards
    if min(args.size, args.pairs, args.forwards, args.threads, args.calls) < 1:
        p.error("--size, --pairs, --forwards, --threads and --calls must be >= 1")
    if args.op:
        os.environ["FASTVLM_BENCH_DTYPE"] = args.dtype
        sys.path.insert(0, _ROOT)
        from bench.test_ops_bench import CASES
        if args.op not in CASES:
            p.error(f"--op: unknown case {args.op!r}; cases: " + ", ".join(repr(c) for c in CASES))
    builds = [_parse_build(s, i) for i, s in enumerate(args.builds)]
    if len({b[0] for b in builds}) != len(builds):
        p.error("build labels must differ")

    times: Dict[str, List[float]] = {label: [] for label, _ in builds}
    per_pair: Dict[str, List[float]] = {label: [] for label, _ in builds}  # each process's median time
    digests: Dict[str, set] = {label: set() for label, _ in builds}
    isas, steady = {}, {}
    t0 = time.perf_counter()
    if args.op:
        what, unit, scale = f"op {args.op!r} (cpu backend), median of {args.calls} calls per process", "ms", 1e3
    else:
        what, unit, scale = (f"{args.forwards} forwards, {args.size}x{args.size}"
                             f"{' (tiny config)' if args.tiny else ''}"), "s", 1.0
    print(f"[ab] {len(builds)} builds x {args.pairs} pairs x {what}, {args.dtype}, {args.threads} threads", flush=True)
    for r in range(args.pairs):
        order = builds if r % 2 == 0 else builds[::-1]
        for label, path in order:
            res = run_one(path, args)
            times[label] += res["times"]
            per_pair[label].append(statistics.median(res["times"]))
            digests[label].add(res["sha256"])
            isas[label] = res["isa"]
            steady[label] = res["steady_malloc"]
            print(f"[ab] pair {r + 1}/{args.pairs} {label}: " + " ".join(f"{t * scale:.3f}" for t in res["times"])
                  + f"  ({time.perf_counter() - t0:.0f}s)", flush=True)

    base = builds[0][0]
    base_med = statistics.median(times[base])
    n = "processes" if args.op else "forwards"
    print(f"\n| build | ISA | {n} | median {unit} | mean {unit} | min {unit} | median vs {base} |")
    print("|---|---|---|---|---|---|---|")
    for label, path in builds:
        v = [t * scale for t in times[label]]
        print(f"| {label} | {isas[label]} | {len(v)} | {statistics.median(v):.3f} | {statistics.mean(v):.3f} | "
              f"{min(v):.3f} | {statistics.median(v) / (base_med * scale):.3f}x |")
    stats = {}
    if len(builds) > 1:
        print(f"\nper pair (each process's median time over the {base} process of its pair):")
    for label, _ in builds[1:]:
        st = stats[label] = pair_stats([a / b for a, b in zip(per_pair[label], per_pair[base])])
        print(f"  {label}: median {st['median']:.3f}x, range {st['min']:.3f}-{st['max']:.3f}x, faster in "
              f"{st['faster']} of {st['pairs']} pairs; 90% interval of the median {st['lo90']:.3f}-{st['hi90']:.3f}x"
              + (" (contains 1: not told apart)" if st["lo90"] <= 1 <= st["hi90"] else ""))
    deterministic = all(len(d) == 1 for d in digests.values())
    same = deterministic and len({next(iter(d)) for d in digests.values()}) == 1
    if not deterministic:
        print("\noutputs: NOT reproducible within a build (different hashes across its processes)")
    else:
        print("\noutputs: " + ("bitwise identical across builds" if same else "differ between builds (hashes: "
                               + ", ".join(f"{label} {next(iter(digests[label]))[:12]}" for label, _ in builds) + ")"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "builds": dict(builds), "times": times, "isa": isas,
                       "steady_malloc": steady, "per_pair": per_pair, "pair_stats": stats,
                       "sha256": {k: sorted(v) for k, v in digests.items()}, "bitwise_identical": same}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
