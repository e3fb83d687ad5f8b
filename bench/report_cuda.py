"""The side-by-side report on an NVIDIA GPU (``python -m bench.report --device cuda``, the default
where CUDA is available).

Systems, each on the same random-weight FastViTHD (see bench.report.build_model):

- ``eager`` / ``eager_cl``: the eager model in NCHW / channels_last;
- ``compile``: ``torch.compile(mode="max-autotune")`` (inductor's autotuning and CUDA graphs),
  compiled afresh for every configuration;
- ``accelerated``: ``fastvlm_kernels.accelerate(backend="triton")``, kernels launched one by one;
- ``accelerated_graphs``: the same, replayed from a CUDA graph (``accelerate(..., cuda_graphs=True)``).

Configurations: bf16 and fp32 at 1024² batch 1 and 32, and 512², 768², 1536² at batch 1, in that
order inside a time budget (what does not fit is listed as skipped). Timing: CUDA events around each
call, interleaved rounds, the median. Each row gives images/s, GFLOP/s and its share of the bf16
matmul rate measured in the same run (torch.mm, 8192³), the rel-L2 of the first image's tokens
against the float64 CPU model, and the one-time costs (building the system, its first call, which
includes compilation, and the capture). Then the time to first token of a FastVLM with Qwen2-0.5B
shapes (random weights) with the eager and the accelerated (graph) tower.

Writes ``<out>/<name>.json``, ``.md`` and ``.png`` (name: the GPU, e.g. ``h100-2026-12-07``).
"""
from __future__ import annotations

import copy
import datetime
import json
import os
import platform
import statistics
import time
import warnings
from typing import Callable, Dict, List, Optional

import torch

import fastvlm_kernels
from bench.report import log
from fastvlm.testing import rel_l2

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
SYSTEMS = ("eager", "eager_cl", "accelerated", "accelerated_graphs", "compile")  # compile last: slowest to build
LABELS = {"eager": "eager NCHW", "eager_cl": "eager channels_last", "compile": "torch.compile max-autotune",
          "accelerated": "accelerated (launches)", "accelerated_graphs": "accelerated + CUDA graph"}


def unavailable() -> Optional[str]:
    """None where the CUDA report can run, else one line saying why not."""
    if not torch.cuda.is_available():
        return f"no CUDA device (torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'})"
    why = fastvlm_kernels.unavailable_reason("triton")
    return f"the triton backend cannot run: {why}" if why else None


def gpu_info() -> Dict:
    p = torch.cuda.get_device_properties(0)
    import triton
    return {"name": p.name, "capability": f"sm_{p.major}{p.minor}", "sms": p.multi_processor_count,
            "memory_gib": round(p.total_memory / 2 ** 30, 1), "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": triton.__version__, "python": platform.python_version(), "fp32_dots": _fp32_dots()}


def _fp32_dots() -> str:
    from fastvlm_kernels.triton.launch import FP32_PRECISION
    return FP32_PRECISION


def cuda_time(fn: Callable[[], object], n: int = 1) -> float:
    """Seconds per call of fn, from CUDA events around n calls."""
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(n):
        fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / 1e3 / n


def rates() -> Dict[str, float]:
    """The bf16 matmul rate (torch.mm 8192³) and the device-to-device copy bandwidth (1 GiB)."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    cuda_time(lambda: a @ a, 3)
    mm = 2 * 8192 ** 3 / min(cuda_time(lambda: a @ a, 10) for _ in range(3)) / 1e9
    src = torch.empty(2 ** 28, device="cuda", dtype=torch.float32)
    dst = torch.empty_like(src)
    cuda_time(lambda: dst.copy_(src), 3)
    bw = 2 * src.numel() * 4 / min(cuda_time(lambda: dst.copy_(src), 10) for _ in range(3)) / 1e9
    return {"bf16_mm_gflops": mm, "copy_gbs": bw}


def build_system(name: str, model, dt: str):
    """(fn(x) -> tokens, setup seconds)."""
    dtype = DTYPES[dt]
    t0 = time.perf_counter()
    m = copy.deepcopy(model).to("cuda", dtype).eval()
    if name == "eager_cl":
        m = m.to(memory_format=torch.channels_last)
    if name == "compile":
        torch._dynamo.reset()
        fn = torch.compile(m, mode="max-autotune")
    elif name.startswith("accelerated"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fastvlm_kernels.accelerate(m, backend="triton", cuda_graphs=name == "accelerated_graphs")
        fn = m
    else:
        fn = m
    torch.cuda.synchronize()
    return fn, time.perf_counter() - t0


def run_config(model, size: int, batch: int, dt: str, ref: torch.Tensor, ref_x: torch.Tensor, rounds: int,
               skip: List[str], gflop: float, mm_rate: float) -> Dict:
    dtype = DTYPES[dt]
    g = torch.Generator().manual_seed(size * 100 + batch)
    x = torch.cat([ref_x, torch.rand(batch - 1, 3, size, size, generator=g)]).to("cuda", dtype)
    res: Dict = {"size": size, "batch": batch, "dtype": dt, "gflop": gflop, "systems": {}}
    fns = {}
    for name in SYSTEMS:
        d = res["systems"][name] = {}
        if name in skip:
            d["skipped"] = "--skip"
            continue
        try:
            fn, d["setup_s"] = build_system(name, model, dt)
            xin = x.contiguous(memory_format=torch.channels_last) if name == "eager_cl" else x
            with torch.inference_mode():
                t0 = time.perf_counter()
                out = fn(xin)
                torch.cuda.synchronize()
                d["first_call_s"] = time.perf_counter() - t0
                d["rel_l2"] = rel_l2(out[:1].double().cpu(), ref)
            fns[name] = (fn, xin)
        except Exception as e:  # noqa: BLE001 - a system that fails is reported, the others go on
            d["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            log(f"    {LABELS[name]}: {d['error']}")
    for name in fns:
        res["systems"][name]["runs_s"] = []
    with torch.inference_mode():
        for _ in range(rounds):
            for name, (fn, xin) in fns.items():
                res["systems"][name]["runs_s"].append(cuda_time(lambda: fn(xin)))
    for name in fns:
        d = res["systems"][name]
        d["median_s"] = statistics.median(d["runs_s"])
        d["images_per_s"] = batch / d["median_s"]
        d["gflops"] = gflop / d["median_s"]
        d["pct_bf16_mm"] = 100 * d["gflops"] / mm_rate
        runner = getattr(fns[name][0], "__dict__", {}).get("_fastvlm_graphs")
        if runner is not None:
            d["graph_bytes"] = sum(runner.stats()["graphs"].values())
    del fns
    torch.cuda.empty_cache()
    return res


def run_ttft(model, dt: str, size: int, llm: str, rounds: int) -> Dict:
    import numpy as np
    from fastvlm.vlm import FastVLM
    dtype = DTYPES[dt]
    base = FastVLM.from_config(llm, seed=0)
    base.projector.to("cuda", dtype)
    base.language_model.to("cuda", dtype)
    eager_tower = copy.deepcopy(model).to("cuda", dtype).eval()
    acc_tower = copy.deepcopy(model).to("cuda", dtype).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fastvlm_kernels.accelerate(acc_tower, backend="triton", cuda_graphs=True)
    vlms = {"eager": FastVLM(eager_tower, base.projector, base.language_model, base.tokenizer, image_size=size),
            "accelerated_graphs": FastVLM(acc_tower, base.projector, base.language_model, base.tokenizer,
                                          image_size=size)}
    image = (np.random.default_rng(0).random((size * 3 // 4, size, 3)) * 255).astype(np.uint8)
    prompt = "<image>\nDescribe the image in detail."
    res: Dict = {"size": size, "dtype": dt, "llm": f"Qwen2-{llm} shapes, random weights",
                 "systems": {k: {"runs": []} for k in vlms}}
    for v in vlms.values():
        v.generate(image, prompt, max_new_tokens=1)
    for _ in range(rounds):
        for k, v in vlms.items():
            res["systems"][k]["runs"].append(v.generate(image, prompt, max_new_tokens=1).ttft.as_dict())
    for d in res["systems"].values():
        for part in ("preprocess", "encode", "project", "prefill", "first_token", "total"):
            d[part] = statistics.median(r[part] for r in d["runs"])
    return res


def markdown(rep: Dict) -> str:
    g, r = rep["gpu"], rep["rates"]
    lines = [f"# FastViTHD side by side on {g['name']} — {rep['date']}", "",
             f"`{rep['command']}`", "",
             f"{g['name']} ({g['capability']}, {g['sms']} SMs), torch {g['torch']}, CUDA {g['cuda']}, triton "
             f"{g['triton']}. Measured in this run: bf16 torch.mm {r['bf16_mm_gflops'] / 1e3:.0f} TFLOP/s, copy "
             f"{r['copy_gbs']:.0f} GB/s. Model: {rep['model']}. The triton backend's fp32 dots: "
             f"{g.get('fp32_dots', 'ieee')}.", "",
             "| config | system | ms | images/s | % bf16 mm | rel-L2 vs fp64 | setup s | first call s |",
             "|---|---|---|---|---|---|---|---|"]
    for c in rep["configs"]:
        label = f"{c['size']}² b{c['batch']} {c['dtype']}"
        for name, d in c["systems"].items():
            if "median_s" in d:
                lines.append(f"| {label} | {LABELS[name]} | {d['median_s'] * 1e3:.3f} | {d['images_per_s']:.1f} | "
                             f"{d['pct_bf16_mm']:.1f} | {d['rel_l2']:.1e} | {d['setup_s']:.2f} | "
                             f"{d['first_call_s']:.2f} |")
            else:
                lines.append(f"| {label} | {LABELS[name]} | — | | | | | {d.get('error') or d.get('skipped')} |")
    for s in rep["skipped_configs"]:
        lines.append(f"\nSkipped: {s}")
    for t in rep["ttft"]:
        if "systems" in t:
            e, a = t["systems"]["eager"], t["systems"]["accelerated_graphs"]
            lines += ["", f"TTFT {t['size']}² {t['dtype']} ({t['llm']}): eager {e['total'] * 1e3:.1f} ms (encode "
                      f"{e['encode'] * 1e3:.1f}), accelerated + graph {a['total'] * 1e3:.1f} ms (encode "
                      f"{a['encode'] * 1e3:.1f}); prefill {a['prefill'] * 1e3:.1f} ms"]
        else:
            lines += ["", f"TTFT {t['dtype']}: not run: {t['skipped']}"]
    if rep.get("tuning_misses"):
        lines += ["", f"Launches the tuning table did not cover: {rep['tuning_misses']}"]
    return "\n".join(lines) + "\n"


def plot(rep: Dict, path: str) -> Optional[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, dt in zip(axes, ("bf16", "fp32")):
        for name in SYSTEMS:
            pts = sorted((c["size"], c["systems"][name]["median_s"] * 1e3) for c in rep["configs"]
                         if c["dtype"] == dt and c["batch"] == 1 and "median_s" in c["systems"].get(name, {}))
            if pts:
                ax.plot(*zip(*pts), marker="o", label=LABELS[name])
        ax.set_title(f"{dt}, batch 1")
        ax.set_xlabel("image side (px)")
        ax.set_ylabel("ms per image")
        ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return None


def main(a, argv) -> Dict:
    """Run from bench.report.main with its parsed arguments (``a``)."""
    from bench.report import build_model, count_gflop, reference_tokens, REF_INPUTS
    from fastvlm_kernels.triton import tuning
    why = unavailable()
    if why:
        raise SystemExit(f"bench.report --device cuda: {why}")
    t_start = time.perf_counter()
    budget = a.budget_min * 60
    gi = gpu_info()
    log(f"FastViTHD side-by-side report on {gi['name']} ({gi['capability']}), torch {gi['torch']}, "
        f"triton {gi['triton']}, budget {a.budget_min:g} min")
    rt = rates()
    torch.cuda.empty_cache()
    log(f"    bf16 torch.mm {rt['bf16_mm_gflops'] / 1e3:.0f} TFLOP/s, copy {rt['copy_gbs']:.0f} GB/s")
    model, desc = build_model(a.checkpoint, a.quick)
    sizes = [int(s) for s in a.sizes.split(",")] if a.sizes else ([128, 192] if a.quick else [1024, 512, 768, 1536])
    big = [] if a.no_batch8 else [(sizes[0], a.batch or 32)]
    plan = [(sizes[0], 1, dt) for dt in ("bf16", "fp32")] + [(s, b, dt) for s, b in big for dt in ("bf16", "fp32")]
    plan += [(s, 1, dt) for dt in ("bf16", "fp32") for s in sizes[1:]]
    skip = [s for s in a.skip.split(",") if s]
    rounds = a.rounds or (3 if a.quick else 20)
    rep = {"date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
           "command": " ".join(["python -m bench.report"] + list(argv)), "model": desc, "gpu": gi, "rates": rt,
           "configs": [], "skipped_configs": [], "ttft": []}
    refs = {}
    for size, batch, dt in plan:
        label = f"{size}x{size} b{batch} {dt}"
        if time.perf_counter() - t_start > budget:
            rep["skipped_configs"].append(f"{label} (time budget)")
            continue
        if size not in refs:
            refs[size] = reference_tokens(model, size)
        log(f"{label}: ...")
        c = run_config(model, size, batch, dt, refs[size], REF_INPUTS[size], rounds, skip,
                       count_gflop(model, size, batch), rt["bf16_mm_gflops"])
        rep["configs"].append(c)
        for name, d in c["systems"].items():
            if "median_s" in d:
                log(f"    {LABELS[name]:<28} {d['median_s'] * 1e3:9.3f} ms  {d['images_per_s']:8.1f} img/s  "
                    f"rel-L2 {d['rel_l2']:.1e}  first call {d['first_call_s']:.1f} s")
        _write(rep, a)  # after every configuration: a timeout loses only the one running
    if not a.no_ttft:
        for dt in ("bf16", "fp32"):
            if time.perf_counter() - t_start > budget:
                rep["ttft"].append({"dtype": dt, "skipped": "time budget"})
                continue
            try:
                rep["ttft"].append(run_ttft(model, dt, sizes[0], a.ttft_llm or ("tiny" if a.quick else "0.5b"),
                                            3 if a.quick else 10))
            except Exception as e:  # noqa: BLE001
                rep["ttft"].append({"dtype": dt, "skipped": f"{type(e).__name__}: {e}"[:300]})
    rep["tuning_misses"] = {" ".join(k): n for k, n in tuning.misses().items()}
    rep["wall_s"] = time.perf_counter() - t_start
    base = _write(rep, a)
    log(markdown(rep))
    why_no_plot = plot(rep, base + ".png")
    log(f"wrote {base}.json, {base}.md" + (f" ({why_no_plot})" if why_no_plot else f", {base}.png"))
    return rep


def gpu_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100' (the results folder's name for the GPU)."""
    import re
    words = name.replace("-", " ").split()
    return next((w for w in words if re.fullmatch(r"[A-Za-z]+\d{2,4}[A-Za-z]*", w) and w.upper() != "NVIDIA"),
                "gpu").lower()


def _write(rep: Dict, a) -> str:
    os.makedirs(a.out, exist_ok=True)
    name = a.name or f"{gpu_slug(rep['gpu']['name'])}-{rep['date'][:10]}"
    base = os.path.join(a.out, name)
    with open(base + ".json", "w") as f:
        json.dump(rep, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(markdown(rep))
    return base
