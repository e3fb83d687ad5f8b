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
    sizes = {(c["size"], c["dtype"]) for c in rep["configs"]}
    assert (128, "fp32") in sizes
    for c in rep["configs"]:
        acc = c["systems"]["accelerated"]
        assert acc["rel_l2"] < (1e-4 if c["dtype"] == "fp32" else 5e-2)
        assert len(acc["times_s"]) >= 1 and acc["median_s"] > 0
        assert c["systems"]["compile"] == {"skipped": "skipped by --skip"}
        if c["dtype"] == "fp32":
            assert c["systems"]["eager"]["rel_l2"] < 1e-4
    md = (tmp_path / "quick.md").read_text()
    assert "| config | system |" in md and "accelerated" in md
