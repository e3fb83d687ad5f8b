"""The ``fastvlm`` command line.

    fastvlm generate --model SRC --image PATH --prompt TEXT [--backend auto] [--dtype float32]
    fastvlm bench [report options]        # the end-to-end side-by-side report (bench/report.py)

``--model`` takes a checkpoint directory (Apple llava_qwen2 or HF fast_vlm layout), a hub id when
online, or ``random:SIZE`` (tiny, 0.5b, 1.5b, 7b) for random weights. The answer streams to stdout;
loading progress, TTFT and tokens/s go to stderr.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from typing import List, Optional

import torch

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def _err(msg: str) -> None:
    print(f"fastvlm: error: {msg}", file=sys.stderr)


def _dtype(name: Optional[str]) -> Optional[torch.dtype]:
    if name is None:
        return None
    if name not in _DTYPES:
        raise argparse.ArgumentTypeError(f"unknown dtype {name!r}; one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


def cmd_generate(a) -> int:
    from .checkpoint import CheckpointError
    from .vlm import IMAGE_TOKEN, FastVLM

    if a.threads:
        torch.set_num_threads(a.threads)
    dtype, llm_dtype = _dtype(a.dtype), _dtype(a.llm_dtype)
    for p in a.image:
        if not os.path.isfile(p):
            _err(f"image file not found: {p}")
            return 2
    t0 = time.perf_counter()
    try:
        if a.model.startswith("random:"):
            print(f"[fastvlm] building a random-weight FastVLM ({a.model[7:]})", file=sys.stderr)
            vlm = FastVLM.from_config(a.model[7:], seed=a.seed or 0)
            if dtype is not None or llm_dtype is not None:
                vlm.vision_tower.to(dtype or torch.float32)
                vlm.projector.to(dtype or torch.float32)
                vlm.language_model.to(llm_dtype or dtype or torch.float32)
        else:
            vlm = FastVLM.from_pretrained(a.model, dtype=dtype, llm_dtype=llm_dtype, progress=True)
    except (CheckpointError, FileNotFoundError, ValueError, ImportError) as e:
        _err(str(e))
        return 2
    vlm = vlm.to(a.device) if a.device else vlm
    if a.backend != "none":
        import fastvlm_kernels
        t1 = time.perf_counter()
        fastvlm_kernels.accelerate(vlm, backend=a.backend)
        print(f"[fastvlm] accelerate(backend={a.backend!r}): {vlm.vision_tower.accelerated_backend} "
              f"({time.perf_counter() - t1:.2f} s)", file=sys.stderr)
    print(f"[fastvlm] ready in {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    prompt = a.prompt
    if a.image and IMAGE_TOKEN not in prompt:
        prompt = (IMAGE_TOKEN + "\n") * len(a.image) + prompt   # predict.py: "<image>\n" + question
    images = list(a.image) if a.image else None

    def stream(i: int, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    try:
        out = vlm.generate(images, prompt, max_new_tokens=a.max_new_tokens, do_sample=a.temperature > 0,
                           temperature=a.temperature if a.temperature > 0 else 1.0, top_p=a.top_p,
                           seed=a.seed, streamer=stream, chat_template=not a.no_chat_template)
    except (ValueError, FileNotFoundError) as e:
        _err(str(e))
        return 2
    sys.stdout.write("\n")
    sys.stdout.flush()
    n = len(out.token_ids[0])
    rate = out.tokens_per_s
    print(f"[fastvlm] {out.ttft}", file=sys.stderr)
    print(f"[fastvlm] {n} tokens; decode {'n/a' if rate != rate else f'{rate:.1f} tokens/s'}", file=sys.stderr)
    return 0


def cmd_bench(rest: List[str]) -> int:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isfile(os.path.join(root, "bench", "report.py")):
        _err("the benchmark lives in the source checkout (bench/report.py), which this install does not "
             "have; clone the repository and run `bash scripts/main.sh` or `fastvlm bench` from there")
        return 2
    if root not in sys.path:
        sys.path.insert(0, root)
    from bench import report
    report.main(rest)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        return cmd_bench(argv[1:])
    ap = argparse.ArgumentParser(prog="fastvlm", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="answer a prompt about images, streaming the answer")
    g.add_argument("--model", required=True, help="checkpoint directory, hub id, or random:{tiny,0.5b,1.5b,7b}")
    g.add_argument("--image", action="append", default=[], help="image file (repeat for several images)")
    g.add_argument("--prompt", required=True, help="the question; '<image>\\n' is put in front when it has no <image>")
    g.add_argument("--backend", default="auto", choices=["auto", "cpu", "triton", "reference", "none"],
                   help="fused-kernel backend for the vision tower (none: eager PyTorch)")
    g.add_argument("--dtype", default=None, help="vision tower + projector dtype: float32 (default), bfloat16, float16")
    g.add_argument("--llm-dtype", default=None, help="LLM dtype (default: --dtype)")
    g.add_argument("--device", default=None, help="torch device, e.g. cuda (default: cpu)")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    g.add_argument("--no-chat-template", action="store_true", help="send the prompt as is, without the qwen_2 template")
    sub.add_parser("bench", help="the end-to-end benchmark report (options: fastvlm bench --help)")
    a = ap.parse_args(argv)
    # A command line's output is the answer and its timings: the libraries' notices to developers
    # (deprecations in transformers, torch) are for code that calls them, not for this user.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        _dtype(a.dtype), _dtype(a.llm_dtype)
    except argparse.ArgumentTypeError as e:
        _err(str(e))
        return 2
    return cmd_generate(a)


if __name__ == "__main__":
    sys.exit(main())
