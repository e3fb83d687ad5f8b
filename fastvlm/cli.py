"""The ``fastvlm`` command line.

    fastvlm generate --model SRC --image PATH --prompt TEXT [--backend auto] [--dtype float32]
    fastvlm serve --model SRC [--port 8000] [--ray --replicas N]   # OpenAI-compatible server
    fastvlm bench [report options]        # the end-to-end side-by-side report (bench/report.py)

``--model`` takes a checkpoint directory (Apple llava_qwen2 or HF fast_vlm layout), a hub id when
online, or ``random:SIZE`` (tiny, 0.5b, 1.5b, 7b) for random weights. The answer streams to stdout;
loading progress, TTFT and tokens/s go to stderr.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import warnings
from typing import List, Optional

import torch

from .serve.server import parse_dtype


def _err(msg: str) -> None:
    print(f"fastvlm: error: {msg}", file=sys.stderr)


def cmd_generate(a) -> int:
    from .checkpoint import CheckpointError
    from .serve.server import load_model
    from .vlm import IMAGE_TOKEN

    if a.threads:
        torch.set_num_threads(a.threads)
    for p in a.image:
        if not os.path.isfile(p):
            _err(f"image file not found: {p}")
            return 2
    t0 = time.perf_counter()
    try:
        vlm = load_model(a.model, a.backend, a.dtype, a.llm_dtype, a.device, a.seed or 0)
    except (CheckpointError, FileNotFoundError, ValueError, ImportError) as e:
        _err(str(e))
        return 2
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


def cmd_serve(a) -> int:
    try:
        from .serve.protocol import Limits
        from .serve.server import ServeOptions, serve_forever
    except ImportError as e:
        _err(f"fastvlm serve needs FastAPI and uvicorn: pip install fastapi uvicorn (the [serve] extra) ({e})")
        return 2
    if a.image_dir is not None and not os.path.isdir(a.image_dir):
        _err(f"--image-dir {a.image_dir!r} is not a directory")
        return 2
    limits = Limits(max_request_bytes=int(a.max_request_mb * (1 << 20)), max_image_bytes=int(a.max_image_mb * (1 << 20)),
                    max_image_pixels=a.max_image_pixels, max_images=a.max_images, max_tokens=a.max_tokens_limit,
                    default_max_tokens=min(a.default_max_tokens, a.max_tokens_limit), image_dir=a.image_dir,
                    allow_urls=a.allow_image_urls)
    opts = ServeOptions(model=a.model, backend=a.backend, dtype=a.dtype, llm_dtype=a.llm_dtype, device=a.device,
                        seed=a.seed or 0, threads=a.threads, served_model_name=a.served_model_name,
                        api_key=a.api_key or os.environ.get("FASTVLM_API_KEY") or None, host=a.host, port=a.port,
                        max_batch=a.max_batch, max_queue=a.max_queue, max_wait_ms=a.max_wait_ms, limits=limits)
    if a.ray:
        return _serve_ray(opts, a)
    from .checkpoint import CheckpointError
    try:
        serve_forever(opts)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        _err(str(e))
        return 2
    except KeyboardInterrupt:
        pass
    return 0


def _serve_ray(opts, a) -> int:
    try:
        import ray
        from ray import serve
        from .serve.ray_app import deployment_for
    except ImportError as e:
        _err(f"fastvlm serve --ray needs Ray Serve: pip install 'ray[serve]' (the [ray] extra) ({e})")
        return 2
    ray.init(address=a.ray_address, logging_level="WARNING")
    serve.start(http_options={"host": opts.host, "port": opts.port})
    app = deployment_for(opts, a.replicas, a.cpus_per_replica, a.max_replicas)
    serve.run(app, name="fastvlm", route_prefix="/")
    print(f"[fastvlm] Ray Serve: {a.replicas} replica(s) of {opts.name()!r} on http://{opts.host}:{opts.port}/v1 "
          "(Ctrl-C stops)", file=sys.stderr, flush=True)
    def stop(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, stop)        # as uvicorn does: SIGTERM stops it like Ctrl-C
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        print("[fastvlm] shutting down Ray Serve", file=sys.stderr, flush=True)
        serve.shutdown()
        ray.shutdown()
    return 0


def _model_args(p) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory, hub id, or random:{tiny,0.5b,1.5b,7b}")
    p.add_argument("--backend", default="auto", choices=["auto", "cpu", "triton", "reference", "none"],
                   help="fused-kernel backend for the vision tower (none: eager PyTorch)")
    p.add_argument("--dtype", default=None, help="vision tower + projector dtype: float32 (default), bfloat16, float16")
    p.add_argument("--llm-dtype", default=None, help="LLM dtype (default: --dtype)")
    p.add_argument("--device", default=None, help="torch device, e.g. cuda (default: cpu)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")


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
    g.add_argument("--image", action="append", default=[], help="image file (repeat for several images)")
    g.add_argument("--prompt", required=True, help="the question; '<image>\\n' is put in front when it has no <image>")
    _model_args(g)
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--no-chat-template", action="store_true", help="send the prompt as is, without the qwen_2 template")
    v = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (chat completions, streaming, batching)",
                       description="Serve FastVLM over an OpenAI-compatible API: POST /v1/chat/completions, "
                                   "GET /v1/models, GET /health. See docs/serving.md.")
    _model_args(v)
    v.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: $FASTVLM_API_KEY; none)")
    v.add_argument("--served-model-name", default=None, help="the model id clients send (default: from --model)")
    v.add_argument("--image-dir", default=None, help="let requests name image files inside this directory (default: none)")
    v.add_argument("--allow-image-urls", action="store_true", help="fetch http(s) image URLs (default: refused)")
    v.add_argument("--max-batch", type=int, default=8, help="requests decoded together (default 8)")
    v.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot before 429 (default 64)")
    v.add_argument("--max-wait-ms", type=float, default=10.0, help="how long an idle server waits to batch arrivals")
    v.add_argument("--max-images", type=int, default=4, help="images per request (default 4)")
    v.add_argument("--max-tokens-limit", type=int, default=2048, help="largest max_tokens a request may ask")
    v.add_argument("--default-max-tokens", type=int, default=512, help="max_tokens when a request gives none")
    v.add_argument("--max-image-mb", type=float, default=16, help="encoded bytes per image (default 16 MiB)")
    v.add_argument("--max-image-pixels", type=int, default=40_000_000, help="pixels per image (default 40 M)")
    v.add_argument("--max-request-mb", type=float, default=32, help="request body size (default 32 MiB)")
    v.add_argument("--ray", action="store_true", help="run as a Ray Serve deployment (needs pip install 'ray[serve]')")
    v.add_argument("--replicas", type=int, default=1, help="--ray: replicas (default 1)")
    v.add_argument("--max-replicas", type=int, default=None, help="--ray: autoscale between --replicas and this")
    v.add_argument("--cpus-per-replica", type=float, default=1.0, help="--ray: CPUs each replica reserves (and threads)")
    v.add_argument("--ray-address", default=None, help="--ray: the cluster to join (default: start a local Ray)")
    sub.add_parser("bench", help="the end-to-end benchmark report (options: fastvlm bench --help)")
    a = ap.parse_args(argv)
    # A command line's output is the answer and its timings: the libraries' notices to developers
    # (deprecations in transformers, torch) are for code that calls them, not for this user.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        parse_dtype(a.dtype), parse_dtype(a.llm_dtype)
    except ValueError as e:
        _err(str(e))
        return 2
    return cmd_serve(a) if a.cmd == "serve" else cmd_generate(a)


if __name__ == "__main__":
    sys.exit(main())
