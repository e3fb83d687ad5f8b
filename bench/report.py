"""The main job: FastViTHD on the built-in random-weight model (or a checkpoint) at 1024x1024.

Interim version (issue: foundation): runs the reference encoder, prints the token shape and the
time. The side-by-side report (eager / channels_last / torch.compile / ONNX Runtime / accelerated)
replaces it with the fused-op layer.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import fastvlm
from fastvlm.testing import randomize_


def build_model(checkpoint=None):
    if checkpoint:
        print(f"loading {checkpoint} ...", flush=True)
        return fastvlm.load_vision_tower(checkpoint).reparameterize()
    m = fastvlm.FastViTHD(inference_mode=True)
    return randomize_(m, seed=0).eval()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="vision tower weights (file, directory or hub id); default: random weights")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--quick", action="store_true", help="tiny model, 256x256, one run (for CI)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    model = fastvlm.FastViTHD(fastvlm.FastViTHDConfig.tiny(), inference_mode=True).eval() if a.quick else build_model(a.checkpoint)
    size, runs = (256, 1) if a.quick else (a.size, a.runs)
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    print(f"FastViTHD reference encoder, {size}x{size}, fp32, {torch.get_num_threads()} threads", flush=True)
    times = []
    with torch.inference_mode():
        out = model(x)  # warm-up
        for i in range(runs):
            t0 = time.perf_counter()
            out = model(x)
            times.append(time.perf_counter() - t0)
            print(f"  run {i + 1}/{runs}: {times[-1]:.3f} s", flush=True)
    print(f"tokens: {tuple(out.shape)}  median: {statistics.median(times):.3f} s")


if __name__ == "__main__":
    main()
