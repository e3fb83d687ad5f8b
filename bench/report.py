"""End-to-end side-by-side report: FastViTHD through eager PyTorch (NCHW and channels_last),
torch.compile (inductor, freezing), ONNX Runtime and the accelerated model, in one process.

    python -m bench.report                      # built-in random-weight FastViTHD, the full matrix
    python -m bench.report --checkpoint PATH    # real weights (file, directory or hub id)
    python -m bench.report --quick              # tiny model, small inputs: a smoke run for CI
    python -m bench.report --device cuda        # on an NVIDIA GPU (the default where CUDA is available):
                                                # bench/report_cuda.py

The peers are measured at their best: the eager model is the one users run (attention through
``F.scaled_dot_product_attention`` and LayerNorm through ``F.layer_norm``, as timm's and transformers'
FastViT; on the same weights it gives bitwise timm's ``fastvit_mci3`` output), loaded from a state
dict as from a checkpoint; torch.compile is compiled afresh for every configuration.

Method: for each configuration (resolution, batch, dtype) every system is built and
called once (the first-call cost is recorded), then timed in interleaved rounds; the median is
reported, with ratios to each peer, GFLOP/s and the share of this machine's measured multiply-add
peak (``fastvlm_kernels.cpu.peak_gflops``: register-only FMA chains; for bf16, TDPBF16PS tile chains
on AMX, vdpbf16ps chains on AVX512_BF16; the better of a run before and one after the timed calls;
torch.mm's rate is recorded beside it for context).
Parity is rel-L2 of the first image's tokens against the float64 eager model on the same weights.

Configurations run in priority order inside a time budget (``--budget-min``): what would not fit
is listed as skipped, with the reason, instead of running past it. Systems that cannot run here are
listed with the reason too (e.g. bf16 peers on a CPU without a fast bf16 GEMM).

Writes ``<out>/<name>.json`` (everything, raw times included), ``<name>.md`` (the table) and
``<name>.png`` (latency vs resolution, one line per system).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
import warnings
from typing import Callable, Dict, List, Optional

import torch

import fastvlm
import fastvlm_kernels
from fastvlm.testing import cpu_flags, random_tower, rel_l2

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SYSTEMS = ("eager", "eager_cl", "compile", "onnxruntime", "accelerated")
LABELS = {"eager": "eager NCHW", "eager_cl": "eager channels_last", "compile": "torch.compile (freezing)",
          "onnxruntime": "ONNX Runtime", "accelerated": "accelerated"}


def log(msg: str) -> None:
    print(msg, flush=True)


class Progress:
    """One line per step with elapsed time and the share of the budget used."""

    def __init__(self, budget_s: float):
        self.t0, self.budget = time.perf_counter(), budget_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def step(self, msg: str) -> None:
        used = self.elapsed()
        filled = int(20 * min(1.0, used / self.budget))
        log(f"[{'#' * filled}{'.' * (20 - filled)}] {used:6.0f}s  {msg}")


# --------------------------------------------------------------------------------------------------
# machine
# --------------------------------------------------------------------------------------------------


def cpu_info() -> Dict:
    flags, model = cpu_flags(), platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"model": model, "cores": os.cpu_count(), "avx2": "avx2" in flags, "avx512f": "avx512f" in flags,
            "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags}


def peak_rates(secs: float = 0.2) -> Dict[str, object]:
    """This machine's multiply-add peak (GFLOP/s) for fp32 and bf16 activations, as the C++ kernels'
    ISA runs them, on torch.get_num_threads() threads (None without the C++ extension), with
    ``peak_source`` saying how it was measured and ``bf16_pairs`` whether bf16 is vdpbf16ps chains."""
    try:
        from fastvlm_kernels import cpu as fk_cpu
    except ImportError:
        return {"peak_fp32_gflops": None, "peak_bf16_gflops": None, "peak_source": "not measured (no C++ extension)",
                "bf16_pairs": False}
    pairs = fk_cpu.uses_bf16_pairs(torch.bfloat16)
    return {"bf16_pairs": pairs, "peak_fp32_gflops": fk_cpu.peak_gflops(torch.float32, secs),
            "peak_bf16_gflops": fk_cpu.peak_gflops(torch.bfloat16, secs),
            "peak_source": f"FMA chains, {fk_cpu.cpu_isa()}" + (
                (", TDPBF16PS (AMX) tile chains for bf16" if fk_cpu.cpu_isa() == "amx_bf16"
                 else ", vdpbf16ps chains for bf16") if pairs else "")}


def gemm_rate(dtype: torch.dtype, n: int, max_s: float = 5.0) -> float:
    """GFLOP/s of torch.mm at n^3 (median of a few calls, bounded in time)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    ts, t_end = [], time.perf_counter() + max_s
    while len(ts) < 5 and time.perf_counter() < t_end:
        t = time.perf_counter()
        torch.mm(a, b)
        ts.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(ts) / 1e9


# --------------------------------------------------------------------------------------------------
# systems
# --------------------------------------------------------------------------------------------------


class System:
    def __init__(self, name: str, fn: Callable, setup_s: float, note: str = ""):
        self.name, self.fn, self.setup_s, self.note = name, fn, setup_s, note


def _onnx_session(model: torch.nn.Module, threads: int, path: str):
    import onnxruntime as ort
    # Export a copy, in eval mode: the legacy exporter runs a forward that may touch BN statistics.
    m = copy.deepcopy(model).float().eval()
    x = torch.rand(1, 3, 128, 128)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, (x,), path, dynamo=False, input_names=["pixels"], output_names=["tokens"],
                          dynamic_axes={"pixels": {0: "b", 2: "h", 3: "w"}, "tokens": {0: "b", 1: "n"}},
                          opset_version=17)
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(sess.run(None, {"pixels": x.numpy()})[0])


class Systems:
    """Builds each system once per dtype (torch.compile once per shape) and keeps one-time costs."""

    def __init__(self, model, threads: int, out_dir: str, fast_bf16: bool, skip: List[str], backend: str):
        self.model, self.threads, self.out_dir = model, threads, out_dir
        self.fast_bf16, self.skip, self.backend = fast_bf16, set(skip), backend
        self.cache: Dict = {}
        self.unavailable: Dict[str, str] = {}
        self._gflop: Dict = {}

    def gflop(self, size: int, batch: int) -> float:
        if (size, batch) not in self._gflop:
            self._gflop[(size, batch)] = count_gflop(self.model, size, batch)
        return self._gflop[(size, batch)]

    def reason_unavailable(self, name: str, dt: str) -> Optional[str]:
        if name in self.skip:
            return "skipped by --skip"
        if name == "onnxruntime" and dt != "fp32":
            return "ONNX Runtime's CPU execution provider is measured in fp32 only"
        if dt == "bf16" and not self.fast_bf16 and name != "accelerated":
            return ("this CPU has no fast bf16 GEMM (no AVX512_BF16/AMX: torch's bf16 matmul runs a scalar "
                    "fallback, >50x slower than fp32), so this bf16 peer would not finish in the budget")
        if name == "onnxruntime":
            try:
                import onnxruntime  # noqa: F401
            except ImportError:
                return "onnxruntime is not installed (pip install onnxruntime onnx)"
        return self.unavailable.get(name)

    def get(self, name: str, dt: str, shape) -> Optional[System]:
        key = (name, dt, shape if name == "compile" else None)
        if key in self.cache:
            return self.cache[key]
        dtype = DTYPES[dt]
        t0 = time.perf_counter()
        note = ""
        try:
            if name == "eager":
                m = copy.deepcopy(self.model).to(dtype)
                fn = m
            elif name == "eager_cl":
                m = copy.deepcopy(self.model).to(dtype).to(memory_format=torch.channels_last)
                fn = lambda x, m=m: m(x.contiguous(memory_format=torch.channels_last))  # noqa: E731
            elif name == "compile":
                import torch._inductor.config as icfg
                icfg.freezing = True
                # A fresh compilation per configuration: dynamo keeps its compiled graphs per code
                # object (FastViTHD.forward), whatever module or wrapper calls it, so without a reset
                # the report's 9-10 shapes run into its recompile limit (8) and the last ones fall
                # back to eager (seen: 1024² batch 8 at 21.3 s against 5.5 s for the accelerated model).
                torch._dynamo.reset()
                for stale in [k for k in self.cache if k[0] == "compile"]:
                    del self.cache[stale]  # their graphs are gone with the reset
                base = self.cache.get(("eager", dt, None))
                m = base.fn if base is not None else copy.deepcopy(self.model).to(dtype)
                fn = torch.compile(m, dynamic=False)
                note = "inductor, freezing=True, dynamic=False (a fresh compilation per shape: dynamo reset)"
            elif name == "onnxruntime":
                fn = _onnx_session(self.model, self.threads, os.path.join(self.out_dir, ".fastvithd.onnx.tmp"))
                note = "CPU provider, ORT_ENABLE_ALL, legacy exporter, dynamic H/W"
            elif name == "accelerated":
                m = copy.deepcopy(self.model)  # the benchmark's own copy, not part of the setup time
                t0 = time.perf_counter()
                with warnings.catch_warnings(record=True) as w:
                    warnings.simplefilter("always")
                    fastvlm_kernels.accelerate(m, backend=self.backend, dtype=dtype)
                fn = m
                note = f"backend={m.accelerated_backend}"
                if w:
                    note += f" ({w[0].message})"
            else:
                raise ValueError(name)
        except Exception as e:  # a peer that cannot be built is reported, not fatal
            self.unavailable[name] = f"{type(e).__name__}: {e}"
            log(f"    {LABELS[name]} unavailable: {self.unavailable[name]}")
            return None
        setup = time.perf_counter() - t0
        sysm = System(name, fn, setup, note)
        self.cache[key] = sysm
        return sysm


# --------------------------------------------------------------------------------------------------
# measuring
# --------------------------------------------------------------------------------------------------


# ONNX Runtime's intra-op worker threads spin for 20-50 ms after each run (its default
# allow_spinning; measured here with the probe: 88-113 GFLOP/s right after a run, 158-180 after
# 20 ms, 216-222 after 50 ms, against 213-226 with no ONNX Runtime call), taking a vCPU from
# whatever runs next; OpenMP workers spin briefly too. Each call waits this long first.
SETTLE_S = 0.1


def run_config(size: int, batch: int, dt: str, systems: Systems, ref_tokens: torch.Tensor, rounds: int,
               prog: Progress, probe: Optional[Callable[[], float]] = None) -> Dict:
    """One configuration, every system timed in interleaved rounds. ``probe`` (GFLOP/s of a short
    multiply-add peak sample) runs before every timed call: on the 2-vCPU machines this project
    measures on, the two threads' FMA throughput drops to about one core's for stretches of ~0.5 s
    (both vCPUs on one physical core, or its other hardware thread busy), and the samples show how
    much of a run fell into such stretches. Every call (first and timed) starts SETTLE_S after the
    previous one ended, so that no system runs while the previous one's idle threads still spin."""
    dtype = DTYPES[dt]
    x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(size + batch))
    x[:1] = REF_INPUTS[size]  # image 0 is the one the float64 reference saw
    x = x.to(dtype)
    res: Dict = {"size": size, "batch": batch, "dtype": dt, "gflop": systems.gflop(size, batch), "systems": {}}
    live = []
    for name in SYSTEMS:
        why = systems.reason_unavailable(name, dt)
        if why:
            res["systems"][name] = {"skipped": why}
            continue
        prog.step(f"{size}x{size} b{batch} {dt}: building {LABELS[name]}")
        s = systems.get(name, dt, (batch, size))
        if s is None:
            res["systems"][name] = {"skipped": systems.unavailable[name]}
            continue
        time.sleep(SETTLE_S)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = s.fn(x)
        first = time.perf_counter() - t0
        err = rel_l2(out[:1].float(), ref_tokens)
        res["systems"][name] = {"setup_s": s.setup_s, "first_call_s": first, "rel_l2": err, "note": s.note,
                                "times_s": []}
        s.setup_s = 0.0  # reported once, with the configuration that paid it
        live.append(s)
    for r in range(rounds):
        prog.step(f"{size}x{size} b{batch} {dt}: round {r + 1}/{rounds} ({', '.join(LABELS[s.name] for s in live)})")
        for s in live:  # interleaved: every system once per round
            time.sleep(SETTLE_S)
            if probe is not None:  # the machine's state just before the call
                res["systems"][s.name].setdefault("peak_probe_gflops", []).append(probe())
            t0 = time.perf_counter()
            with torch.inference_mode():
                s.fn(x)
            res["systems"][s.name]["times_s"].append(time.perf_counter() - t0)
    for s in live:
        d = res["systems"][s.name]
        d["median_s"] = statistics.median(d["times_s"])
        d["gflops"] = res["gflop"] / d["median_s"]
    return res


REF_INPUTS: Dict[int, torch.Tensor] = {}
SLOW_PROBE = 0.6  # a probe below this share of the measured peak counts as a slow stretch


def ttft_unavailable(dt: str, fast_bf16: bool) -> Optional[str]:
    try:
        import transformers  # noqa: F401
        import tokenizers  # noqa: F401
    except ImportError:
        return "transformers/tokenizers are not installed (pip install transformers tokenizers: the [vlm] extra)"
    if dt == "bf16" and not fast_bf16:
        return ("the LLM prefill in bf16 needs a fast bf16 GEMM, which this CPU lacks (no AVX512_BF16/AMX); "
                "~300 GFLOP at ~1 GFLOP/s would not finish")
    return None


TTFT_TEXT = ("Describe the image in detail. What is in this picture, and what does the chart show about "
             "sales over four years? Answer briefly.")


def run_ttft(model, dt: str, size: int, llm: str, rounds: int, backend: str, prog: Progress) -> Dict:
    """Time to first token of a FastVLM (this encoder + projector + Qwen2 of the ``llm`` shapes, random
    weights): preprocess + encode + project + prefill + first token, eager vs accelerated tower,
    the same projector and LLM (transformers, SDPA), interleaved rounds."""
    import numpy as np
    from fastvlm.vlm import FastVLM
    dtype = DTYPES[dt]
    prog.step(f"TTFT {size}x{size} {dt}: building Qwen2-{llm} shapes, random weights")
    t0 = time.perf_counter()
    base = FastVLM.from_config(llm, seed=0)
    build_s = time.perf_counter() - t0
    base.projector.to(dtype)
    base.language_model.to(dtype)
    eager_tower = copy.deepcopy(model).to(dtype).eval()
    acc_tower = copy.deepcopy(model).eval()
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fastvlm_kernels.accelerate(acc_tower, backend=backend, dtype=dtype)
    acc_s = time.perf_counter() - t0
    vlms = {"eager": FastVLM(eager_tower, base.projector, base.language_model, base.tokenizer, image_size=size),
            "accelerated": FastVLM(acc_tower, base.projector, base.language_model, base.tokenizer, image_size=size)}
    image = (np.random.default_rng(0).random((size * 3 // 4, size, 3)) * 255).astype(np.uint8)
    prompt = "<image>\n" + TTFT_TEXT
    res: Dict = {"size": size, "dtype": dt, "llm": f"Qwen2-{llm} shapes, random weights", "build_s": build_s,
                 "accelerate_s": acc_s, "systems": {k: {"runs": []} for k in vlms}, "first_tokens": {}}
    for k, v in vlms.items():  # warm-up, and the tokens each one picks
        prog.step(f"TTFT {size}x{size} {dt}: first call, {k}")
        out = v.generate(image, prompt, max_new_tokens=1)
        res["first_tokens"][k] = out.token_ids[0]
        res["prompt_tokens"] = out.ttft.prompt_tokens
    for r in range(rounds):
        prog.step(f"TTFT {size}x{size} {dt}: round {r + 1}/{rounds}")
        for k, v in vlms.items():
            res["systems"][k]["runs"].append(v.generate(image, prompt, max_new_tokens=1).ttft.as_dict())
    for k, d in res["systems"].items():
        for part in ("preprocess", "encode", "project", "prefill", "first_token", "total"):
            d[part] = statistics.median(run[part] for run in d["runs"])
    return res


def count_gflop(model, size: int, batch: int = 1) -> float:
    """Convolution + matmul GFLOP of one forward (2 per MAC), counted on the meta device (no compute)."""
    from torch.utils.flop_counter import FlopCounterMode
    m = copy.deepcopy(model).to("meta")
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        m(torch.empty(batch, 3, size, size, device="meta"))
    return fc.get_total_flops() / 1e9


def reference_tokens(model, size: int) -> torch.Tensor:
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(1000 + size))
    REF_INPUTS[size] = x
    m64 = copy.deepcopy(model).double()
    with torch.inference_mode():
        return m64(x.double())


# --------------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------------


def _peak(m: Dict, dtype: str) -> float:
    # the measured multiply-add peak for that dtype's kernels; reports written before it was measured
    # (or without the extension) fall back to the best torch.mm rate for that storage dtype
    got = m.get("peak_fp32_gflops" if dtype == "fp32" else "peak_bf16_gflops")
    if got:
        return got
    return m["gemm_fp32_gflops"] if dtype == "fp32" else max(m["gemm_bf16_gflops"], m["gemm_fp32_gflops"])


def _peak_col(m: Dict) -> str:
    return "% of peak" if m.get("peak_fp32_gflops") else "% of GEMM rate"


def _peak_text(m: Dict) -> str:
    if not m.get("peak_fp32_gflops"):
        return m.get("peak_source", "not measured")
    return (f"fp32 {m['peak_fp32_gflops']:.0f} GFLOP/s, bf16 {m['peak_bf16_gflops']:.0f} GFLOP/s "
            f"({m['peak_source']})")


def markdown(report: Dict) -> str:
    m = report["machine"]
    lines = [f"# FastViTHD side by side — {report['date']}", "",
             f"Machine: {m['cpu']['model']}, {m['cpu']['cores']} cores, AVX2={m['cpu']['avx2']}, "
             f"AVX-512={m['cpu']['avx512f']}, AVX512_BF16={m['cpu']['avx512_bf16']}; torch {m['torch']}, "
             f"{m['threads']} threads; measured multiply-add peak: {_peak_text(m)}; "
             f"torch.mm rate for comparison: fp32 {m['gemm_fp32_gflops']:.0f} GFLOP/s, "
             f"bf16 {m['gemm_bf16_gflops']:.1f} GFLOP/s.",
             f"Model: {report['model']}. Accelerated backend: {report['backend']}.", "",
             "Median seconds of interleaved rounds (n = rounds); ratio = system time / accelerated time "
             "(> 1: accelerated is faster); rel-L2 of image 0's tokens against float64 eager. "
             + report.get("one_time_note", "") + ".", ""]
    sens = report.get("image_sensitivity")
    if sens:
        lines[-1:] = [f"For scale: two different random images' float64 outputs at {sens['size']}² differ by rel-L2 "
                      f"{sens['rel_l2']:.2e}, so a kernel that lost the image would show up at that level.", ""]
    hdr = f"| config | system | median s | n | vs accelerated | GFLOP/s | {_peak_col(m)} | rel-L2 | first call s | setup s |"
    lines += [hdr, "|---" * (hdr.count("|") - 1) + "|"]
    notes: List[str] = []
    for c in report["configs"]:
        cfg = f"{c['size']}² b{c['batch']} {c['dtype']}"
        acc = c["systems"].get("accelerated", {}).get("median_s")
        peak = _peak(m, c["dtype"])
        for name in SYSTEMS:
            d = c["systems"].get(name)
            if d is None:
                continue
            if "skipped" in d:
                if d["skipped"] not in notes:
                    notes.append(d["skipped"])
                lines.append(f"| {cfg} | {LABELS[name]} | not run [{notes.index(d['skipped']) + 1}] | | | | | | | |")
                continue
            ratio = f"{d['median_s'] / acc:.2f}x" if acc else ""
            lines.append(f"| {cfg} | {LABELS[name]} | {d['median_s']:.3f} | {len(d['times_s'])} | {ratio} | "
                         f"{d['gflops']:.0f} | {100 * d['gflops'] / peak:.0f}% | {d['rel_l2']:.1e} | "
                         f"{d['first_call_s']:.2f} | {d['setup_s']:.2f} |")
    if notes:
        lines += [""] + [f"[{i + 1}] {n}" for i, n in enumerate(notes)]
    probes = [v for c in report["configs"] for d in c["systems"].values() for v in d.get("peak_probe_gflops", [])]
    if probes and m.get("peak_fp32_gflops"):
        slow = sum(v < SLOW_PROBE * m["peak_fp32_gflops"] for v in probes)
        lines += ["", f"Machine state during the timed calls: {len(probes)} samples of the fp32 multiply-add peak "
                      f"(20 ms each, one before every timed call, {SETTLE_S:.1f} s after the previous call): "
                      f"median {statistics.median(probes):.0f} GFLOP/s, "
                      f"{slow} below {100 * SLOW_PROBE:.0f}% of the measured peak (stretches where this machine's "
                      f"{m['threads']} threads get less FMA throughput than the peak run had; per-call samples in "
                      "the JSON)."]
    if report.get("ttft"):
        lines += ["", "## Time to first token (FastVLM: this encoder + projector + Qwen2, transformers SDPA)", "",
                  "Median seconds of interleaved rounds: preprocess (PIL image -> tensor) + encode + project + "
                  "prefill + first token; the same projector and LLM for both rows.", "",
                  "| config | tower | TTFT s | preprocess | encode | project | prefill | first token | vs accelerated |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for t in report["ttft"]:
            if "skipped" in t:
                lines.append(f"| {t['size']}² {t['dtype']} | not run: {t['skipped']} | | | | | | | |")
                continue
            acc = t["systems"]["accelerated"]["total"]
            for k in ("eager", "accelerated"):
                d = t["systems"][k]
                lines.append(f"| {t['size']}² {t['dtype']}, {t['llm']}, {t['prompt_tokens']} prompt tokens | {k} | "
                             f"{d['total']:.3f} | {d['preprocess']:.3f} | {d['encode']:.3f} | {d['project']:.3f} | "
                             f"{d['prefill']:.3f} | {d['first_token']:.3f} | {d['total'] / acc:.2f}x |")
            same = t["first_tokens"]["eager"] == t["first_tokens"]["accelerated"]
            lines.append(f"| | first token eager vs accelerated | {'identical' if same else 'DIFFERENT'} | | | | | | |")
    if report["skipped_configs"]:
        lines += ["", "Not run (time budget): " + "; ".join(report["skipped_configs"])]
    lines += ["", f"Total wall time {report['wall_s']:.0f} s. Command: `{report['command']}`"]
    return "\n".join(lines) + "\n"


def plot(report: Dict, path: str) -> Optional[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, dt in zip(axes, DTYPES):
        for name in SYSTEMS:
            pts = sorted((c["size"], c["systems"][name]["median_s"]) for c in report["configs"]
                         if c["dtype"] == dt and c["batch"] == 1 and "median_s" in c["systems"].get(name, {}))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=LABELS[name])
        ax.set_title(f"FastViTHD, batch 1, {dt}")
        ax.set_xlabel("input resolution (px)")
        ax.set_ylabel("latency (s)")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    m = report["machine"]
    fig.suptitle(f"{m['cpu']['model']}, {m['threads']} threads, torch {m['torch']} — {report['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------


def build_model(checkpoint: Optional[str], quick: bool) -> (torch.nn.Module, str):
    if checkpoint:
        log(f"loading {checkpoint} ...")
        return fastvlm.load_vision_tower(checkpoint).reparameterize().eval(), f"checkpoint {checkpoint}"
    cfg = fastvlm.FastViTHDConfig.tiny() if quick else fastvlm.FastViTHDConfig()
    # Randomised in the train form, then folded: randomising the inference form directly makes the
    # output nearly independent of the image (see fastvlm.testing.random_tower), and then a parity
    # figure says little. The report prints how far apart two images' outputs are, for scale.
    sd = {k: v.clone() for k, v in random_tower(cfg, seed=0, weight_gain=0.85 if quick else 0.5).state_dict().items()}
    gc.collect()
    # Loaded from its state dict, as a checkpoint is, once the train form is gone: the model built
    # and folded in place leaves glibc's heap fragmented around its weights, and the eager peers then
    # take 1.3M page faults per 1024² forward instead of 0.25-0.6M and run 30-50% slower (Zen 4, the
    # same ops, bitwise the same output); which is the benchmark's doing, not the eager model's.
    m = fastvlm.load_vision_tower(sd, config=cfg)
    del sd
    name = "tiny FastViTHD" if quick else "FastViTHD"
    return m, (f"{name}, random weights (train form randomised: O(1) layer scales, randomised BN statistics; "
               "then folded to the inference form)")


def main(argv=None) -> Dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="vision tower weights (file, directory or hub id); default: random weights")
    ap.add_argument("--quick", action="store_true", help="tiny model, 128/192 px, 2 rounds (CI smoke run)")
    ap.add_argument("--threads", type=int, default=None, help="torch/ORT threads (default: all cores)")
    ap.add_argument("--budget-min", type=float, default=14.0, help="time budget in minutes (default 14)")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds per configuration (default 3; 2 for batch 8)")
    ap.add_argument("--sizes", default=None, help="comma-separated batch-1 resolutions (default 1024,512,768,1536)")
    ap.add_argument("--no-batch8", action="store_true", help="skip the 1024x1024 batch-8 configurations")
    ap.add_argument("--skip", default="", help=f"comma-separated systems to leave out: {','.join(SYSTEMS)}")
    ap.add_argument("--backend", default="auto", help="accelerate() backend (default auto)")
    ap.add_argument("--no-ttft", action="store_true", help="skip the FastVLM time-to-first-token rows")
    ap.add_argument("--ttft-llm", default=None, help="Qwen2 shapes for TTFT: 0.5b (default), 1.5b, 7b, tiny (--quick)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--name", default=None, help="output file stem (default: cpu-<threads>t, or quick; on CUDA "
                    "<gpu>-<date>)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="where to run: cuda where available (auto), else cpu; cuda: bench/report_cuda.py")
    ap.add_argument("--batch", type=int, default=None, help="the large batch at the first size (default 8 on CPU, "
                    "32 on CUDA)")
    a = ap.parse_args(argv)
    device = a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda":
        from bench import report_cuda
        why = report_cuda.unavailable()
        if why:
            print(f"bench.report --device cuda: {why}", file=sys.stderr)
            raise SystemExit(2)
        return report_cuda.main(a, argv if argv is not None else sys.argv[1:])

    threads = a.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    os.makedirs(a.out, exist_ok=True)
    name = a.name or ("quick" if a.quick else f"cpu-{threads}t")
    budget = a.budget_min * 60
    prog = Progress(budget)
    cpu = cpu_info()
    log(f"FastViTHD side-by-side report — {cpu['model']}, {cpu['cores']} cores, {threads} threads, torch "
        f"{torch.__version__}, budget {a.budget_min:g} min")
    prog.step("measuring this machine's multiply-add peak and GEMM rates (torch.mm)")
    peaks = peak_rates(0.05 if a.quick else 0.2)
    probe = None
    if peaks["peak_fp32_gflops"]:  # a 20 ms fp32 sample before every timed call (run_config)
        from fastvlm_kernels import cpu as fk_cpu
        probe = lambda: fk_cpu.peak_gflops(torch.float32, 0.02, 1)  # noqa: E731
    g32 = gemm_rate(torch.float32, 256 if a.quick else 1024)
    g16 = gemm_rate(torch.bfloat16, 256, max_s=3.0)
    g32_small = gemm_rate(torch.float32, 256) if not a.quick else g32
    fast_bf16 = g16 > 0.2 * g32_small
    log(f"    peak: {_peak_text(peaks)}; torch.mm fp32 {g32:.0f} GFLOP/s, bf16 {g16:.1f} GFLOP/s -> fast bf16 "
        f"path: {fast_bf16}")

    model, model_desc = build_model(a.checkpoint, a.quick)
    if a.quick:
        sizes, batch8, rounds = [128, 192], [], a.rounds or 2
        rounds8 = rounds
    else:
        sizes = [int(s) for s in a.sizes.split(",")] if a.sizes else [1024, 512, 768, 1536]
        batch8 = [] if a.no_batch8 else [1024]
        rounds, rounds8 = a.rounds or 3, a.rounds or 2
    # priority order: the headline first, then the resolution sweep, then batch 8; fp32 before bf16
    plan = [(sizes[0], 1, "fp32"), (sizes[0], 1, "bf16")]
    plan += [(s, 1, "fp32") for s in sizes[1:]] + [(s, 1, "bf16") for s in sizes[1:]]
    plan += [(s, a.batch or 8, dt) for s in batch8 for dt in ("fp32", "bf16")]

    systems = Systems(model, threads, a.out, fast_bf16, [s for s in a.skip.split(",") if s], a.backend)
    report = {"date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "command": " ".join(
                  ["python -m bench.report"] + (argv if argv is not None else sys.argv[1:])),
              "model": model_desc, "backend": a.backend,
              "machine": {"cpu": cpu, "threads": threads, "torch": torch.__version__, "python": platform.python_version(),
                          "gemm_fp32_gflops": g32, "gemm_bf16_gflops": g16, "fast_bf16": fast_bf16, **peaks},
              "configs": [], "skipped_configs": [], "ttft": []}
    refs: Dict[int, torch.Tensor] = {}
    per_gflop_round = None  # seconds per GFLOP of one round over all systems, learned as we go
    ttft_after = 2 if len(plan) >= 2 else len(plan)  # TTFT right after the 1024² fp32/bf16 headline
    ttft_llm = a.ttft_llm or ("tiny" if a.quick else "0.5b")
    for idx, item in enumerate(plan + [None]):
        if idx == ttft_after and not a.no_ttft:
            for tdt in ("fp32", "bf16"):
                why = ttft_unavailable(tdt, fast_bf16)
                est = 60 if not a.quick else 5
                if why is None and prog.elapsed() + est > budget:
                    why = f"time budget ({budget - prog.elapsed():.0f} s left)"
                if why:
                    report["ttft"].append({"size": sizes[0], "dtype": tdt, "skipped": why})
                    log(f"    TTFT {tdt}: not run: {why}")
                    continue
                t = run_ttft(model, tdt, sizes[0], ttft_llm, rounds, a.backend, prog)
                report["ttft"].append(t)
                e, c = t["systems"]["eager"], t["systems"]["accelerated"]
                log(f"    TTFT {tdt}: eager {e['total']:.3f} s (encode {e['encode']:.3f}), accelerated "
                    f"{c['total']:.3f} s (encode {c['encode']:.3f}); prefill {c['prefill']:.3f} s, "
                    f"{t['prompt_tokens']} prompt tokens")
        if item is None:
            break
        size, batch, dt = item
        label = f"{size}x{size} b{batch} {dt}"
        gflop = systems.gflop(size, batch)
        n_rounds = rounds8 if batch > 1 else rounds
        if per_gflop_round is not None:
            projected = per_gflop_round * gflop * (n_rounds + 1) * (1.0 if dt == "fp32" else 0.6)
            if prog.elapsed() + projected > budget:
                why = f"{label} (projected {projected:.0f} s, {budget - prog.elapsed():.0f} s left)"
                report["skipped_configs"].append(why)
                log(f"    skipping {why}")
                continue
        if size not in refs:
            prog.step(f"{size}x{size}: float64 reference")
            refs[size] = reference_tokens(model, size)
            if "image_sensitivity" not in report:
                # The scale for the parity column: how far apart two different images' outputs are.
                x2 = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(7))
                with torch.inference_mode():
                    other = copy.deepcopy(model).double()(x2.double())
                report["image_sensitivity"] = {"size": size, "rel_l2": rel_l2(other, refs[size])}
                log(f"    two different images' float64 outputs differ by rel-L2 "
                    f"{report['image_sensitivity']['rel_l2']:.2e} (the scale for the parity column)")
        t0 = time.perf_counter()
        res = run_config(size, batch, dt, systems, refs[size], n_rounds, prog, probe)
        spent = time.perf_counter() - t0
        if dt == "fp32":
            per_gflop_round = spent / gflop / (n_rounds + 1)
        report["configs"].append(res)
        acc = res["systems"].get("accelerated", {}).get("median_s")
        for nm, d in res["systems"].items():
            if "median_s" in d:
                vs = f"  ({d['median_s'] / acc:.2f}x accelerated)" if acc and nm != "accelerated" else ""
                log(f"    {LABELS[nm]:<26} {d['median_s']:8.3f} s  rel-L2 {d['rel_l2']:.1e}{vs}")
    if peaks["peak_fp32_gflops"]:
        # The peak once more, after the timed calls: on a shared VM one measurement can land in a slow
        # stretch (a 68 GFLOP/s start on a machine whose per-call samples had a 76 median), which would
        # overstate every "% of peak". The column divides by the better of the two runs; both are kept.
        prog.step("measuring the multiply-add peak again (the column uses the better of the two runs)")
        end = peak_rates(0.05 if a.quick else 0.2)
        m, keys = report["machine"], ("peak_fp32_gflops", "peak_bf16_gflops")
        m["peak_runs"] = {"start": {k: peaks[k] for k in keys}, "end": {k: end[k] for k in keys}}
        m.update({k: max(peaks[k], end[k]) for k in keys})
        m["peak_source"] += "; the better of a run before and one after the timed calls"
    report["wall_s"] = prog.elapsed()
    report["one_time_note"] = ("setup_s = building the system (accelerate(): reparameterize + fold + pack, not "
                               "counting the report's own deepcopy of the model; "
                               "compile: torch.compile wrapper; ORT: export + session); first_call_s = its first "
                               "call, which includes torch.compile's compilation")
    for f in os.listdir(a.out):
        if f.endswith(".onnx.tmp"):
            os.remove(os.path.join(a.out, f))
    base = os.path.join(a.out, name)  # an absolute --name replaces a.out
    with open(f"{base}.json", "w") as fh:
        json.dump(report, fh, indent=1)
    md = markdown(report)
    with open(f"{base}.md", "w") as fh:
        fh.write(md)
    why_no_plot = plot(report, f"{base}.png")
    log("")
    log(md)
    log(f"wrote {base}.json, {base}.md" + ("" if why_no_plot else f", {base}.png") +
        (f" ({why_no_plot})" if why_no_plot else ""))
    return report


if __name__ == "__main__":
    main()
