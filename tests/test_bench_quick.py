"""The benchmark's --quick run executes and writes its JSON / markdown (no timing assertions)."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_report_quick_runs_and_writes_results(tmp_path):
    cmd = [sys.executable, "-m", "bench.report", "--quick", "--out", str(tmp_path), "--skip", "compile"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rep = json.loads((tmp_path / "quick.json").read_text())
    assert {"machine", "configs", "date", "model"} <= set(rep)
    assert rep["machine"]["threads"] >= 1
    import fastvlm_kernels
    if fastvlm_kernels.extension_available():  # the "% of peak" column divides by the measured FMA peak
        assert rep["machine"]["peak_fp32_gflops"] > 0 and rep["machine"]["peak_bf16_gflops"] > 0
        runs = rep["machine"]["peak_runs"]  # the column's peak: the better of the runs before and after
        for k in ("peak_fp32_gflops", "peak_bf16_gflops"):
            assert rep["machine"][k] == max(runs["start"][k], runs["end"][k]) > 0
    sizes = {(c["size"], c["dtype"]) for c in rep["configs"]}
    assert (128, "fp32") in sizes
    for c in rep["configs"]:
        acc = c["systems"]["accelerated"]
        assert acc["rel_l2"] < (1e-4 if c["dtype"] == "fp32" else 5e-2)
        assert len(acc["times_s"]) >= 1 and acc["median_s"] > 0
        assert c["systems"]["compile"] == {"skipped": "skipped by --skip"}
        if c["dtype"] == "fp32":
            assert c["systems"]["eager"]["rel_l2"] < 1e-4
            try:  # where ONNX Runtime is installed, the model exports and runs (a peer must not vanish)
                import onnxruntime  # noqa: F401
                assert c["systems"]["onnxruntime"]["rel_l2"] < 1e-4, c["systems"]["onnxruntime"]
            except ImportError:
                pass
    md = (tmp_path / "quick.md").read_text()
    assert "| config | system |" in md and "accelerated" in md
    if fastvlm_kernels.extension_available():
        assert "| % of peak |" in md and "measured multiply-add peak: fp32 " in md
        for c in rep["configs"]:  # one machine-state sample before every timed call
            for d in c["systems"].values():
                if "times_s" in d:
                    assert len(d["peak_probe_gflops"]) == len(d["times_s"]) and min(d["peak_probe_gflops"]) > 0
        assert "Machine state during the timed calls: " in md


def test_ab_runs_and_checks_outputs(tmp_path):
    """bench.ab on one build given twice: both labels timed, outputs reported bitwise identical (the
    hashes of two processes' outputs); a missing build is refused."""
    import fastvlm_kernels
    if not fastvlm_kernels.extension_available():
        import pytest
        pytest.skip("the C++ extension is not built")
    so = os.environ.get("FASTVLM_EXT") or fastvlm_kernels.load_extension().__file__
    cmd = [sys.executable, "-m", "bench.ab", f"one={so}", f"two={so}", "--tiny", "--size", "96", "--pairs", "1",
           "--forwards", "1", "--json", str(tmp_path / "ab.json")]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "outputs: bitwise identical across builds" in out.stdout
    assert "per pair (each process's median time over the one process of its pair):" in out.stdout
    assert "  two: median " in out.stdout and "faster in " in out.stdout
    rep = json.loads((tmp_path / "ab.json").read_text())
    assert rep["bitwise_identical"] and set(rep["times"]) == {"one", "two"}
    assert all(len(v) == 1 and v[0] > 0 for v in rep["times"].values())
    st = rep["pair_stats"]["two"]  # one pair: the interval is that pair's ratio
    assert st["pairs"] == 1 and st["lo90"] == st["hi90"] == st["median"] == rep["times"]["two"][0] / rep["times"]["one"][0]
    bad = subprocess.run([sys.executable, "-m", "bench.ab", so, str(tmp_path / "missing.so")], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "no such extension build" in bad.stderr


def test_ab_pair_stats():
    """bench.ab's per-pair summary: the median, range and faster-count of the ratios, and a bootstrap
    interval of the median that is a point for identical ratios, excludes 1 when every pair favours
    the build by a few percent, and contains 1 when the pairs disagree."""
    from bench.ab import pair_stats
    same = pair_stats([1.02] * 5)
    assert same["lo90"] == same["hi90"] == same["median"] == 1.02 and same["faster"] == 0
    win = pair_stats([0.95, 0.97, 0.96, 0.94, 0.98, 0.93])
    assert (win["median"], win["min"], win["max"], win["faster"], win["pairs"]) == (0.955, 0.93, 0.98, 6, 6)
    assert 0.93 <= win["lo90"] < win["median"] < win["hi90"] < 1
    mixed = pair_stats([0.93, 1.10, 0.98, 1.02, 0.97, 1.05])
    assert mixed["faster"] == 3 and mixed["lo90"] < 1 < mixed["hi90"]
    assert pair_stats([0.9, 1.1, 1.0], seed=3) == pair_stats([0.9, 1.1, 1.0], seed=3)  # reproducible


def test_ab_op_mode(tmp_path):
    """bench.ab --op: one per-op case timed per process, seeded inputs (so one build given twice gives
    bitwise identical outputs); an unknown case is refused with the list of cases, and whole-model
    options beside --op are refused."""
    import fastvlm_kernels
    if not fastvlm_kernels.extension_available():
        import pytest
        pytest.skip("the C++ extension is not built")
    so = os.environ.get("FASTVLM_EXT") or fastvlm_kernels.load_extension().__file__
    cmd = [sys.executable, "-m", "bench.ab", f"one={so}", f"two={so}", "--op", "dwconv cpe4 16x16x1536",
           "--pairs", "1", "--calls", "3", "--steady-malloc", "--json", str(tmp_path / "ab.json")]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "outputs: bitwise identical across builds" in out.stdout and "| median ms |" in out.stdout
    rep = json.loads((tmp_path / "ab.json").read_text())
    assert rep["bitwise_identical"] and all(len(v) == 1 and v[0] > 0 for v in rep["times"].values())
    assert rep["steady_malloc"] == {"one": True, "two": True}  # the children ran with the MALLOC_* settings
    mixed = subprocess.run([sys.executable, "-m", "bench.ab", so, so, "--op", "conv_exp 16x16x1536", "--tiny"],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert mixed.returncode != 0 and "whole-model" in mixed.stderr
    bad = subprocess.run([sys.executable, "-m", "bench.ab", so, so, "--op", "no such op"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "unknown case" in bad.stderr and "conv_exp 16x16x1536" in bad.stderr


def test_report_on_cuda_without_a_gpu_says_why_in_one_line():
    import pytest
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA (scripts/gpu_check.sh runs the CUDA report)")
    out = subprocess.run([sys.executable, "-m", "bench.report", "--device", "cuda"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("bench.report --device cuda: no CUDA device")


def test_gpu_results_folder_names():
    from bench.report_cuda import gpu_slug
    assert gpu_slug("NVIDIA H100 80GB HBM3") == "h100"
    assert gpu_slug("NVIDIA H200") == "h200"
    assert gpu_slug("NVIDIA A100-SXM4-80GB") == "a100"


def test_ops_bench_writes_json_and_cuda_mode_says_why_it_cannot_run(tmp_path):
    """The per-op microbenchmarks: FASTVLM_BENCH_JSON gets one row per (case, system) with the floor
    beside it; FASTVLM_BENCH_DEVICE=cuda on a machine without a usable GPU skips every case with the
    reason (on a GPU, scripts/gpu_check.sh runs it); an unknown device is refused."""
    import torch
    env = {**os.environ, "FASTVLM_BENCH_COMPILE": "0", "FASTVLM_BENCH_JSON": str(tmp_path / "ops.json")}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", "bench/test_ops_bench.py",
           "-k", "cpe4"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rep = json.loads((tmp_path / "ops.json").read_text())
    assert rep["device"] == "cpu" and rep["machine"]["copy_gbs"] > 0
    systems = {r["system"] for r in rep["rows"]}
    assert "eager" in systems and not any("triton" in s for s in systems)
    for r in rep["rows"]:
        assert r["case"] == "dwconv cpe4 16x16x1536" and r["min_ms"] <= r["ms"] and r["floor_ms"] > 0
    if not torch.cuda.is_available():
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                             env={**env, "FASTVLM_BENCH_DEVICE": "cuda", "FASTVLM_BENCH_JSON": ""})
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        assert "FASTVLM_BENCH_DEVICE=cuda: no CUDA device" in out.stdout and " passed" not in out.stdout
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**env, "FASTVLM_BENCH_DEVICE": "tpu"})
    assert out.returncode != 0 and "FASTVLM_BENCH_DEVICE='tpu': cpu or cuda" in out.stdout + out.stderr


def test_gpu_check_keeps_to_its_budget(tmp_path):
    """scripts/gpu_check.sh must end within GPU_CHECK_BUDGET_S whatever its stages do: here every stage
    is a Python that hangs, so the first stage is cut at the budget and the rest are recorded as
    skipped, and stages.json stays valid JSON."""
    import time
    stub = tmp_path / "python"
    stub.write_text('#!/usr/bin/env bash\nif [ "${1:-}" = "-" ]; then cat >/dev/null; echo stub python; exit 0; fi\n'
                    'if [ "${1:-}" = "-c" ]; then exit 1; fi\nsleep 120\n')
    stub.chmod(0o755)
    out_dir = tmp_path / "out"
    t = time.monotonic()
    run = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=ROOT, capture_output=True, text=True, timeout=100,
                         env={**os.environ, "PYTHON": str(stub), "OUT": str(out_dir), "GPU_CHECK_BUDGET_S": "17"})
    elapsed = time.monotonic() - t
    assert elapsed < 40, (elapsed, run.stdout[-2000:])
    stages = json.loads((out_dir / "stages.json").read_text())
    assert [s["stage"] for s in stages] == ["tests", "encoder", "encoder_ieee", "report", "ops", "done"]
    assert stages[0]["rc"] == 124 and 15 <= stages[0]["seconds"] <= 25  # cut by `timeout` at the budget
    assert all(s["rc"] == "skipped" for s in stages[1:5])
