"""Microbenchmark fixtures: this machine's measured GEMM rate and copy bandwidth (for the roofline
floors printed beside each op), and a summary table at the end of the run (also as JSON where
FASTVLM_BENCH_JSON names a file).

FASTVLM_BENCH_DEVICE=cuda runs the ops on the GPU instead (the triton backend against eager and
torch.compile); on a machine without CUDA every case is skipped with the reason."""
import json
import os
import statistics
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fastvlm.testing import cpu_flags  # noqa: E402

DEVICE = os.environ.get("FASTVLM_BENCH_DEVICE", "cpu")
if DEVICE not in ("cpu", "cuda"):
    raise ValueError(f"FASTVLM_BENCH_DEVICE={DEVICE!r}: cpu or cuda")
THREADS = int(os.environ.get("FASTVLM_BENCH_THREADS", os.cpu_count() or 1))
torch.set_num_threads(THREADS)


def _steady_malloc() -> str:
    """glibc's heap trimming and per-block mmap off for this process (mallopt), as bench.ab
    --steady-malloc does for its children: otherwise whether an op's megabyte output lands on fresh
    pages (minor faults, zeroed by the kernel) changes from call to call and process to process,
    which moved the stem's and patch_embed 1's medians by 25-40% between runs (2 vCPU Xeon,
    2026-12-04). Every system of a case runs under the same setting. FASTVLM_BENCH_MALLOC=default
    leaves glibc as it is. Returns what the summary says about it."""
    if os.environ.get("FASTVLM_BENCH_MALLOC", "steady") == "default":
        return "malloc: glibc defaults (FASTVLM_BENCH_MALLOC=default)"
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        from bench.ab import STEADY_MALLOC  # the same settings, as environment variables for child processes
        param = {"MALLOC_TRIM_THRESHOLD_": -1, "MALLOC_TOP_PAD_": -2, "MALLOC_MMAP_THRESHOLD_": -3}  # mallopt's M_*
        ok = all(libc.mallopt(param[k], int(v)) == 1 for k, v in STEADY_MALLOC.items())
    except (OSError, AttributeError):
        ok = False
    return ("malloc: glibc heap trimming and per-block mmap off (mallopt; FASTVLM_BENCH_MALLOC=default for the "
            "defaults), so calls reuse mapped pages" if ok else "malloc: not glibc, left as it is")


MALLOC = _steady_malloc()
ROWS = []
MACHINE = []  # the session's machine figures, for the summary


def _median_time(fn, n=5):
    fn()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def _cuda_machine():
    """The GPU's roofline: torch.mm's rates at 8192^3 and the device-to-device copy bandwidth, measured
    with CUDA events (bench.report_cuda). bf16: on tensor cores. fp32: the rate of the triton
    backend's fp32 dots, so with tf32x3 dots (the default) the TF32 tensor-core rate / 3 (three
    products per multiply-add), with FASTVLM_TRITON_FP32=ieee the rate with TF32 off (CUDA cores)."""
    from bench import report_cuda as rc
    from fastvlm_kernels.triton.launch import FP32_PRECISION
    why = rc.unavailable()
    if why:
        pytest.skip(f"FASTVLM_BENCH_DEVICE=cuda: {why}")
    r = rc.rates()
    a = torch.randn(8192, 8192, device="cuda")
    tf32 = FP32_PRECISION == "tf32x3"
    prev, torch.backends.cuda.matmul.allow_tf32 = torch.backends.cuda.matmul.allow_tf32, tf32
    try:
        rc.cuda_time(lambda: a @ a, 2)
        mm = 2 * 8192 ** 3 / min(rc.cuda_time(lambda: a @ a, 5) for _ in range(3)) / 1e9
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    fp32_rate = mm / 3 if tf32 else mm
    gpu = rc.gpu_info()
    MACHINE.append({"gemm_gflops": mm, "gemm_gflops_bf16": r["bf16_mm_gflops"], "fast_bf16": True,
                    "copy_gbs": r["copy_gbs"], "peak_gflops": fp32_rate, "peak_gflops_bf16": r["bf16_mm_gflops"],
                    "fp32_dots": FP32_PRECISION,
                    "peak_source": f"torch.mm 8192^3 on {gpu['name']}", "threads": THREADS, "gpu": gpu})
    return MACHINE[-1]


@pytest.fixture(scope="session")
def machine():
    if DEVICE == "cuda":
        return _cuda_machine()
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    mm = 2 * 1024 ** 3 / _median_time(lambda: torch.mm(a, b)) / 1e9
    src = torch.randn(32 * 1024 * 1024 // 4)  # 32 MiB, well past the caches
    dst = torch.empty_like(src)
    bw = 2 * src.numel() * 4 / _median_time(lambda: dst.copy_(src)) / 1e9  # read + write
    fast_bf16 = bool({"avx512_bf16", "amx_bf16"} & cpu_flags())
    if fast_bf16:
        ab, bb = a.bfloat16(), b.bfloat16()
        mm16 = 2 * 1024 ** 3 / _median_time(lambda: torch.mm(ab, bb)) / 1e9
    else:  # PyTorch's scalar bf16 fallback: not a rate worth showing
        mm16 = mm
    # the compute roofline: the multiply-add peak of the C++ kernels' ISA (bench.report.peak_rates:
    # register-only FMA chains; for bf16 AMX tile chains or vdpbf16ps chains), on THREADS threads;
    # torch.mm's rate is kept for context only (MKL reaches well under the peak, so a floor from it
    # would be too low). Without the C++ extension the best measured GEMM rate stands in, and says so.
    from bench.report import peak_rates
    pk = peak_rates()
    fma = {torch.float32: pk["peak_fp32_gflops"] or mm, torch.bfloat16: pk["peak_bf16_gflops"] or max(mm, mm16)}
    source = pk["peak_source"] if pk["peak_fp32_gflops"] else "no C++ extension: torch.mm rate instead"
    MACHINE.append({"gemm_gflops": mm, "gemm_gflops_bf16": mm16, "fast_bf16": fast_bf16, "copy_gbs": bw,
                    "peak_gflops": fma[torch.float32], "peak_gflops_bf16": fma[torch.bfloat16], "peak_source": source,
                    "threads": THREADS})
    return MACHINE[-1]



_FP32_RATE = {"tf32x3": "fp32 as tf32x3 (TF32 rate / 3)", "ieee": "fp32 (TF32 off)"}


def pytest_terminal_summary(terminalreporter):
    if not ROWS:
        return
    tr = terminalreporter
    dt = os.environ.get("FASTVLM_BENCH_DTYPE", "fp32")
    tr.write_sep("=", f"FastViTHD ops at 1024x1024 shapes, {dt}: median ms, and the roofline floor")
    tr.write_line(f"{'op / shape':<44}{'system':<22}{'ms':>9}{'min ms':>9}{'floor ms':>10}{'x floor':>9}"
                  f"{'min x floor':>13}")
    for r in ROWS:
        tr.write_line(f"{r['case']:<44}{r['system']:<22}{r['ms']:>9.2f}{r['min_ms']:>9.2f}{r['floor_ms']:>10.2f}"
                      f"{r['ms'] / r['floor_ms']:>9.1f}{r['min_ms'] / r['floor_ms']:>13.1f}")
    m = MACHINE[0] if MACHINE else None
    out = os.environ.get("FASTVLM_BENCH_JSON")
    if out:
        with open(out, "w") as f:
            json.dump({"device": DEVICE, "dtype": dt, "machine": m, "rows": ROWS, "malloc": MALLOC}, f, indent=1)
    if m is not None and DEVICE == "cuda":
        bf = dt in ("bf16", "bfloat16")
        tr.write_line(f"floor = max(FLOPs / measured matmul rate, bytes / measured copy bandwidth) on {m['gpu']['name']}: "
                      f"{'bf16' if bf else _FP32_RATE[m['fp32_dots']]} {m['peak_gflops_bf16' if bf else 'peak_gflops']:.0f} "
                      f"GFLOP/s ({m['peak_source']}), copy {m['copy_gbs']:.0f} GB/s")
        tr.write_line("ms: the median of 5 rounds of CUDA-event time over 20 back-to-back calls each (launches "
                      "included, no CUDA graphs); min ms: the fastest round. torch.compile: the default mode.")
    elif m is not None:
        bf = dt in ("bf16", "bfloat16")
        tr.write_line(f"floor = max(FLOPs / measured multiply-add peak, bytes / measured copy bandwidth); {THREADS} "
                      f"threads; peak {m['peak_gflops_bf16' if bf else 'peak_gflops']:.0f} GFLOP/s ({m['peak_source']}"
                      "), copy "
                      f"{m['copy_gbs']:.1f} GB/s; torch.mm 1024^3 for comparison: fp32 {m['gemm_gflops']:.0f} GFLOP/s"
                      + (f", bf16 {m['gemm_gflops_bf16']:.0f}" if m["fast_bf16"] else ""))
        tr.write_line("ms: the median of the timed calls; min ms: the fastest. The peak is the best of a few "
                      "short runs, so 'min x floor' compares like with like where the machine's throughput drifts "
                      "(on 2-vCPU VMs the two threads can drop to about one core's FMA rate for stretches).")
        tr.write_line(MALLOC)
