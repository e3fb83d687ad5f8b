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
identical" claim. On a noisy shared machine (this project's 2-vCPU CI machine drifts by +-15% over
minutes) prefer more pairs over more forwards per process.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Tuple

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
times = []
with torch.no_grad():
    y = m(x)
    for _ in range(forwards):
        t = time.perf_counter()
        m(x)
        times.append(time.perf_counter() - t)
digest = hashlib.sha256(y.float().contiguous().numpy().tobytes()).hexdigest()
print(json.dumps({"times": times, "sha256": digest, "isa": fastvlm_kernels.cpu.cpu_isa()}))
"""


def _parse_build(spec: str, i: int) -> Tuple[str, str]:
    label, sep, path = spec.partition("=")
    if not sep:
        label, path = chr(ord("A") + i), spec
    if not os.path.isfile(path):
        raise SystemExit(f"bench.ab: no such extension build: {path!r}")
    return label, os.path.abspath(path)


def run_one(path: str, args) -> Dict:
    env = dict(os.environ, FASTVLM_EXT=path)
    cmd = [sys.executable, "-c", _CHILD, str(args.size), str(args.forwards), str(args.threads), args.dtype,
           "1" if args.tiny else "0"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"bench.ab: the run with {path} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("builds", nargs="+", help="extension builds (_C*.so), each PATH or LABEL=PATH; two or more")
    p.add_argument("--size", type=int, default=1024, help="square input size (default 1024)")
    p.add_argument("--pairs", type=int, default=4, help="rounds of one process per build (default 4)")
    p.add_argument("--forwards", type=int, default=3, help="timed forwards per process (default 3)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--tiny", action="store_true", help="FastViTHDConfig.tiny() instead of the released shapes")
    p.add_argument("--json", help="also write everything to this file")
    args = p.parse_args(argv)
    if len(args.builds) < 2:
        p.error("give at least two builds to compare")
    if min(args.size, args.pairs, args.forwards, args.threads) < 1:
        p.error("--size, --pairs, --forwards and --threads must be >= 1")
    builds = [_parse_build(s, i) for i, s in enumerate(args.builds)]
    if len({b[0] for b in builds}) != len(builds):
        p.error("build labels must differ")

    times: Dict[str, List[float]] = {label: [] for label, _ in builds}
    digests: Dict[str, set] = {label: set() for label, _ in builds}
    isas = {}
    t0 = time.perf_counter()
    print(f"[ab] {len(builds)} builds x {args.pairs} pairs x {args.forwards} forwards, {args.size}x{args.size} "
          f"{args.dtype}{' (tiny config)' if args.tiny else ''}, {args.threads} threads", flush=True)
    for r in range(args.pairs):
        order = builds if r % 2 == 0 else builds[::-1]
        for label, path in order:
            res = run_one(path, args)
            times[label] += res["times"]
            digests[label].add(res["sha256"])
            isas[label] = res["isa"]
            print(f"[ab] pair {r + 1}/{args.pairs} {label}: " + " ".join(f"{t:.3f}" for t in res["times"])
                  + f"  ({time.perf_counter() - t0:.0f}s)", flush=True)

    base = builds[0][0]
    base_med = statistics.median(times[base])
    print(f"\n| build | ISA | forwards | median s | mean s | min s | median vs {base} |")
    print("|---|---|---|---|---|---|---|")
    for label, path in builds:
        v = times[label]
        print(f"| {label} | {isas[label]} | {len(v)} | {statistics.median(v):.3f} | {statistics.mean(v):.3f} | "
              f"{min(v):.3f} | {statistics.median(v) / base_med:.3f}x |")
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
                       "sha256": {k: sorted(v) for k, v in digests.items()}, "bitwise_identical": same}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
