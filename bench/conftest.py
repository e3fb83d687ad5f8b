"""Microbenchmark fixtures: this machine's measured GEMM rate and copy bandwidth (for the roofline
floors printed beside each op), and a summary table at the end of the run."""
import os
import statistics
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fastvlm.testing import cpu_flags  # noqa: E402

THREADS = int(os.environ.get("FASTVLM_BENCH_THREADS", os.cpu_count() or 1))
torch.set_num_threads(THREADS)
ROWS = []


def _median_time(fn, n=5):
    fn()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


@pytest.fixture(scope="session")
def machine():
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    peak = 2 * 1024 ** 3 / _median_time(lambda: torch.mm(a, b)) / 1e9
    src = torch.randn(32 * 1024 * 1024 // 4)  # 32 MiB, well past the caches
    dst = torch.empty_like(src)
    bw = 2 * src.numel() * 4 / _median_time(lambda: dst.copy_(src)) / 1e9  # read + write
    fast_bf16 = bool({"avx512_bf16", "amx_bf16"} & cpu_flags())
    if fast_bf16:
        ab, bb = a.bfloat16(), b.bfloat16()
        peak16 = 2 * 1024 ** 3 / _median_time(lambda: torch.mm(ab, bb)) / 1e9
    else:  # PyTorch's scalar bf16 fallback: its rate would make a meaningless floor
        peak16 = peak
    return {"gemm_gflops": peak, "gemm_gflops_bf16": peak16, "fast_bf16": fast_bf16, "copy_gbs": bw,
            "threads": THREADS}



def pytest_terminal_summary(terminalreporter):
    if not ROWS:
        return
    tr = terminalreporter
    dt = os.environ.get("FASTVLM_BENCH_DTYPE", "fp32")
    tr.write_sep("=", f"FastViTHD ops at 1024x1024 shapes, {dt}: median ms, and the roofline floor")
    tr.write_line(f"{'op / shape':<44}{'system':<22}{'ms':>9}{'floor ms':>10}{'x floor':>9}")
    for r in ROWS:
        tr.write_line(f"{r['case']:<44}{r['system']:<22}{r['ms']:>9.2f}{r['floor_ms']:>10.2f}{r['ms'] / r['floor_ms']:>9.1f}")
    tr.write_line("floor = max(FLOPs / measured torch.mm rate (fp32, or bf16 with FASTVLM_BENCH_DTYPE=bf16 on a "
                  "CPU with a fast bf16 GEMM; else the fp32 rate), bytes / measured copy bandwidth); "
                  f"{THREADS} threads")
