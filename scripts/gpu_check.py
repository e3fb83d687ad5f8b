"""The whole-encoder stage of scripts/gpu_check.sh: FastViTHD (default config, random weights) at
1024² on the triton backend against the eager model on the GPU and the float64 model on the CPU, in
bf16, fp16 and fp32; CUDA-graph replay against eager launches (bitwise); outputs poisoned first (the
allocator's cache is filled with NaN, so an element no kernel writes shows up); the tuning table's
misses. Prints a short table and writes one JSON (argv[1])."""
import copy
import json
import os
import sys
import time

import torch

import fastvlm
import fastvlm_kernels as fk
from fastvlm.testing import random_tower, rel_l2
from fastvlm_kernels.triton import tuning
from fastvlm_kernels.triton.launch import FP32_PRECISION


def poison():
    """Fill the caching allocator's free blocks with NaN: a later torch.empty likely reuses them."""
    free = torch.cuda.mem_get_info()[0]
    t = torch.empty(int(free * 0.5) // 4, device="cuda", dtype=torch.float32).fill_(float("nan"))
    del t


def main(path):
    size, out = int(os.environ.get("GPU_CHECK_SIZE", "1024")), {"fp32_precision": FP32_PRECISION}
    torch.manual_seed(0)
    m = random_tower(fastvlm.FastViTHDConfig(), seed=0, weight_gain=0.5).eval()
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    t0 = time.perf_counter()
    with torch.inference_mode():
        ref = copy.deepcopy(m).double()(x.double())
    out["float64_cpu_s"] = time.perf_counter() - t0
    with torch.inference_mode():
        other = copy.deepcopy(m).double()(torch.rand_like(x).double())
    out["two_images_rel_l2"] = rel_l2(other, ref)
    rows = []
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        name = str(dt).split(".")[-1]
        xd = x.to("cuda", dt)
        eager = copy.deepcopy(m).to("cuda", dt)
        acc = copy.deepcopy(m).to("cuda", dt)
        t0 = time.perf_counter()
        fk.accelerate(acc, backend="triton")
        acc_s = time.perf_counter() - t0
        with torch.inference_mode():
            e = eager(xd)
            poison()
            t0 = time.perf_counter()
            a = acc(xd)
            torch.cuda.synchronize()
            first_s = time.perf_counter() - t0
            a2 = acc(xd)
            fk.accelerate(acc, backend="triton", cuda_graphs=True)
            poison()
            t0 = time.perf_counter()
            g1 = acc(xd)
            torch.cuda.synchronize()
            capture_s = time.perf_counter() - t0
            g2 = acc(xd.flip(0))  # a replay on another input: the images swapped
        r = {"dtype": name, "accelerate_s": acc_s, "first_call_s": first_s, "capture_s": capture_s,
             "finite": bool(torch.isfinite(a).all()), "deterministic": bool(torch.equal(a, a2)),
             "rel_l2_vs_float64": rel_l2(a.double().cpu(), ref), "eager_rel_l2_vs_float64": rel_l2(e.double().cpu(), ref),
             "graph_equals_eager_launches": bool(torch.equal(g1, a)),
             "graph_replay_other_input": rel_l2(g2.flip(0).float().cpu(), a.float().cpu())}
        rows.append(r)
        del eager, acc
        torch.cuda.empty_cache()
    out["rows"] = rows
    out["tuning_misses"] = {" ".join(k): n for k, n in tuning.misses().items()}
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(f"encoder {size}x{size} b2, float64 CPU reference {out['float64_cpu_s']:.1f} s; two images differ by "
          f"{out['two_images_rel_l2']:.2e}; fp32 dots: {FP32_PRECISION}")
    print(f"{'dtype':<9} {'rel-L2 acc':>11} {'rel-L2 eager':>12} {'finite':>6} {'determ':>6} {'graph==eager':>12} "
          f"{'accel s':>7} {'1st call s':>10} {'capture s':>9}")
    for r in rows:
        print(f"{r['dtype']:<9} {r['rel_l2_vs_float64']:11.2e} {r['eager_rel_l2_vs_float64']:12.2e} {r['finite']!s:>6} "
              f"{r['deterministic']!s:>6} {r['graph_equals_eager_launches']!s:>12} {r['accelerate_s']:7.2f} "
              f"{r['first_call_s']:10.2f} {r['capture_s']:9.2f}")
    if out["tuning_misses"]:
        print("tuning table misses:", out["tuning_misses"])
    ok = all(r["finite"] and r["graph_equals_eager_launches"] for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    if not torch.cuda.is_available():
        print("gpu_check.py: no CUDA device", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1]))
