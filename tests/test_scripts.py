"""The standalone check programs in scripts/ (no torch: they include the kernels' own headers) build,
run, and report the accuracy the kernels' comments claim: a change to gelu.h or to vec.h's
exponentials that breaks either shows up here as well as in the op tests."""
import os
import re
import shutil
import subprocess

import pytest

from fastvlm.testing import cpu_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

needs_avx2_gxx = pytest.mark.skipif(not shutil.which("g++") or not {"avx2", "fma"} <= cpu_flags(),
                                    reason="needs g++ and an AVX2 + FMA CPU (the programs use the kernels' AVX2 code)")


def _build_and_run(tmp_path, name, *args):
    exe = tmp_path / name
    cc = subprocess.run(["g++", "-O3", "-std=c++17", "-mavx2", "-mfma", "-Icsrc", f"scripts/{name}.cpp", "-o", str(exe)],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert cc.returncode == 0, cc.stderr[-3000:]
    out = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@needs_avx2_gxx
def test_gelu_check(tmp_path):
    out = _build_and_run(tmp_path, "gelu_check")
    m = re.search(r"^gelu\.h\s+([\d.]+) ns per vector; max \|err\| on \[-10, 10\] ([\d.e+-]+)", out, re.M)
    assert m, out
    assert float(m.group(1)) > 0 and float(m.group(2)) < 1e-6, out  # gelu.h: 9.5e-7
    m = re.search(r"^gelu\.h bf16-output form\s+([\d.]+) ns per vector; .* relative to max\(1, \|x\|\) ([\d.e+-]+)",
                  out, re.M)
    assert m, out
    assert float(m.group(1)) > 0 and float(m.group(2)) < 5e-6, out  # 3.4e-6: bf16's half-ulp is 2e-3 relative
    if "avx512f" not in cpu_flags():
        assert "16-lane bf16-output forms: not run" in out, out
        return
    # the AVX-512 kernels' vgelu_bf16 (gelu.h's piecewise cubic), over [-12, 12]: past both ends of its table
    m = re.search(r"^16 lanes, piecewise\s+([\d.]+) ns per vector; .* relative to max\(1, \|x\|\) ([\d.e+-]+)",
                  out, re.M)
    assert m, out
    assert float(m.group(1)) > 0 and float(m.group(2)) < 4e-6, out  # 2.9e-6
    assert re.search(r"GELU\(nan\) = -?nan, GELU\(inf\) = inf, GELU\(-inf\) = -?nan, GELU\(3e38\) = 3e\+38, "
                     r"GELU\(-3e38\) = -?0, GELU\(0\) = 0\n", out), out  # as torch's GELU: -inf * 0 is NaN


@needs_avx2_gxx
def test_softmax_check(tmp_path):
    out = _build_and_run(tmp_path, "softmax_check", "96", "64")  # a small phase 2: 96 tokens, 2 heads
    errs = re.findall(r"max relative error, arguments e\^\[-86.6, 0\]: ([\d.e+-]+)|same: ([\d.e+-]+)", out)
    vexp, vexp2 = float(errs[0][0]), float(errs[1][1])
    assert vexp < 3e-7 and vexp2 < 1.5e-7, out  # measured 2.3e-7 and 1.2e-7
    edges = re.search(r"2\^0 = (\S+), 2\^-125 = (\S+), 2\^-3e38 = (\S+), 2\^-inf = (\S+), 2\^NaN = (\S+)", out)
    assert edges, out
    one, lo, far, ninf, nan = edges.groups()
    assert float(one) == 1.0 and nan == "nan", out
    assert all(float(v) == pytest.approx(2.0 ** -125, rel=1e-5) for v in (lo, far, ninf)), out  # printed to 6 digits
    assert re.search(r"phase 2 .*N = 96 tokens, C = 64, .*GFLOP/s", out), out


def _setup_plan(tmp_path, torch_version, cuda):
    """scripts/setup.sh's plan (FASTVLM_SETUP_DRY_RUN) with a stand-in torch of the given version and
    CUDA build first on the path."""
    pkg = tmp_path / "fake" / "torch"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(f"__version__ = {torch_version!r}\nclass version:\n    cuda = {cuda!r}\n")
    env = dict(os.environ, FASTVLM_SETUP_DRY_RUN="1", PYTHONPATH=str(tmp_path / "fake"))
    out = subprocess.run(["bash", "scripts/setup.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_setup_keeps_an_installed_cuda_torch(tmp_path):
    """The GPU machines come with a CUDA torch and no network: setup.sh keeps it. A CPU torch of
    another version is replaced by the pinned CPU build, as before."""
    plan = _setup_plan(tmp_path, "2.11.0+cu130", "13.0")
    assert "keeping the installed torch 2.11.0 (CUDA 13.0)" in plan and "torch==" not in plan, plan
    assert "--no-build-isolation --no-deps -e ." in plan          # and builds against it
    plan = _setup_plan(tmp_path / "cpu", "2.9.0+cpu", None)
    assert "pip install -q torch==2.13.0" in plan and "keeping" not in plan, plan


def test_aot_triton_needs_a_version_and_skips_one_it_cannot_install(tmp_path):
    """scripts/aot_triton.sh (the AOT test under another Triton, run by scripts/test.sh): a usage
    error without a version; a Triton it cannot install (here: no index) is a warning and exit 0,
    with its half-made environment removed. Installing a real one needs the network (CI does it)."""
    out = subprocess.run(["bash", "scripts/aot_triton.sh"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "usage" in out.stderr, out.stderr
    env_dir = tmp_path / "env"
    env = dict(os.environ, AOT_TRITON_ENV=str(env_dir), PIP_NO_INDEX="1", PIP_FIND_LINKS=str(tmp_path))
    out = subprocess.run(["bash", "scripts/aot_triton.sh", "0.0"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "could not install triton 0.0" in out.stdout and not env_dir.exists(), out.stdout


def test_gelu_fit_prints_gelu_h_table():
    """csrc/kernels/gelu.h's piecewise bf16-output GELU table is what scripts/gelu_fit.py fits (to
    LAPACK's last bits), and its constants are the script's: the table is not edited by hand."""
    import importlib.util
    import numpy as np
    spec = importlib.util.spec_from_file_location("gelu_fit", os.path.join(ROOT, "scripts", "gelu_fit.py"))
    fit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fit)
    from rounding_models import gelu_bf16_pw_table
    const, rows = gelu_bf16_pw_table()
    assert np.float32(const["kH"]) == np.float32(fit.H) and np.float32(const["kInvH"]) == np.float32(1 / fit.H)
    assert np.float32(const["kHi"]) == np.float32(fit.HI) and float(const["kMid"]) == fit.MID
    table = {k: np.array(v, dtype=np.float32) for k, v in rows.items()}
    c = fit.fit()
    assert sorted(table) == ["C0", "C1", "C2", "C3"]
    for k in range(4):
        np.testing.assert_allclose(table[f"C{k}"], c[:, k], rtol=1e-6, atol=1e-12)
    x = np.linspace(-12, 12, 200_001).astype(np.float32)
    err = np.abs(fit.evaluate(c, x) - fit.gelu(x.astype(np.float64))) / np.maximum(1, np.abs(x))
    assert err.max() < 3e-6  # gelu.h: 2.9e-6
