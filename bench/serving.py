"""Serving benchmark: the OpenAI-compatible server under 1, 4 and 16 concurrent clients, eager tower
against the accelerated one, the same projector and LLM.

    python -m bench.serving                       # Qwen2-0.5B shapes (random weights), 1024x1024 images
    python -m bench.serving --quick               # tiny model, a smoke run for CI
    python -m bench.serving --dtype bfloat16 --concurrency 1,4,16 --out bench/results/zen4

Both servers run in this process (uvicorn on loopback, one at a time); the clients are threads that
stream chat completions over HTTP, one request after another, each with its own JPEG image (base64
data URI). TTFT is what a client sees: from sending the request to the first event of the stream, which the
server sends at the first token (upload, image decoding and preprocessing, queueing, encoding,
prefill and the first token). Random weights with a small test tokenizer often sample tokens that
decode to no text, so the first content chunk would be the wrong clock. Requests/s is the
number of requests over the wall time of the level. Every answer runs ``max_tokens`` tokens
(``ignore_eos``), so both towers do the same decoding work; the servers alternate in order from one
concurrency level to the next. Writes ``<out>/<name>.json`` (raw times included) and ``<name>.md``.
"""
from __future__ import annotations

import argparse
import base64
import copy
import datetime
import http.client
import io
import json
import os
import statistics
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List

import numpy as np
import torch

from bench.report import cpu_info

LLM_TEXT = "Describe the image in detail. What is in this picture? Answer briefly."


def _jpeg(size: int, seed: int) -> bytes:
    """A photo-like test image (smooth noise, so JPEG sizes are realistic), size x 3/4 size."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    small = (rng.random((size * 3 // 64, size // 16, 3)) * 255).astype(np.uint8)
    im = Image.fromarray(small).resize((size, size * 3 // 4), Image.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _request(port: int, model: str, image: bytes, max_tokens: int) -> Dict:
    body = json.dumps({"model": model, "stream": True, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                       "messages": [{"role": "user", "content": [
                           {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," +
                                                               base64.b64encode(image).decode()}},
                           {"type": "text", "text": LLM_TEXT}]}]})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    r = conn.getresponse()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {r.read()[:300]!r}")
    ttft, chunks, timings = None, 0, None
    for line in r:
        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
            continue
        if ttft is None:                  # the server starts the stream at the first token
            ttft = time.perf_counter() - t0
        ev = json.loads(line[6:])
        delta = ev["choices"][0]["delta"] if ev.get("choices") else {}
        chunks += bool(delta.get("content"))
        if "timings" in ev:
            timings = ev["timings"]
    conn.close()
    return {"ttft_s": ttft, "total_s": time.perf_counter() - t0, "chunks": chunks, "server": timings}


def _pct(xs: List[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(round(q * (len(xs) - 1)))))]


def run_level(port: int, model: str, conc: int, n: int, images: List[bytes], max_tokens: int) -> Dict:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(conc) as ex:
        runs = list(ex.map(lambda i: _request(port, model, images[i % len(images)], max_tokens), range(n)))
    wall = time.perf_counter() - t0
    ttft = [r["ttft_s"] for r in runs]
    return {"concurrency": conc, "requests": n, "wall_s": wall, "requests_per_s": n / wall,
            "ttft_p50_s": statistics.median(ttft), "ttft_p99_s": _pct(ttft, 0.99),
            "server_queue_p50_s": statistics.median(r["server"]["queue_s"] for r in runs),
            "server_encode_p50_s": statistics.median(r["server"]["encode_s"] for r in runs),
            "server_prefill_p50_s": statistics.median(r["server"]["prefill_s"] for r in runs),
            "runs": runs}


def markdown(rep: Dict) -> str:
    m = rep["machine"]
    lines = [f"# Serving benchmark — {rep['date']}", "",
             f"Machine: {m['model']}, {m['cores']} cores, {rep['threads']} torch threads; torch {rep['torch']}.  ",
             f"Model: {rep['model']}; {rep['image_size']}x{rep['image_size']} images (JPEG, base64), "
             f"{rep['max_tokens']} tokens per answer, tower + LLM {rep['dtype']}; engine batch {rep['max_batch']}.  ",
             f"Command: `{rep['command']}`", "",
             "| clients | requests | tower | requests/s | TTFT p50 (s) | TTFT p99 (s) | queue p50 | encode p50 | "
             "prefill p50 | encoder batches |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for lvl in rep["levels"]:
        for tower in ("eager", "accelerated"):
            r = lvl[tower]
            batches = ", ".join(f"{k}x{v}" for k, v in sorted(r["encode_batches"].items()))
            lines.append(f"| {lvl['concurrency']} | {r['requests']} | {tower} | {r['requests_per_s']:.3f} | "
                         f"{r['ttft_p50_s']:.2f} | {r['ttft_p99_s']:.2f} | {r['server_queue_p50_s']:.2f} | "
                         f"{r['server_encode_p50_s']:.2f} | {r['server_prefill_p50_s']:.2f} | {batches} |")
        e, a = lvl["eager"], lvl["accelerated"]
        lines.append(f"| {lvl['concurrency']} | | **accelerated / eager** | **{a['requests_per_s'] / e['requests_per_s']:.2f}x** "
                     f"| **{a['ttft_p50_s'] / e['ttft_p50_s']:.2f}x** | **{a['ttft_p99_s'] / e['ttft_p99_s']:.2f}x** | | | | |")
    lines += ["", "Ratios: accelerated / eager (requests/s: higher is better; TTFT: lower is better). "
              "TTFT: client-side, request sent to the stream's first event (sent at the first token). queue / encode / prefill: the server's "
              "own timings per request (encode is the batched vision-tower call the request was part of). "
              "Encoder batches: images per tower call x calls."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> Dict:
    import uvicorn
    import fastvlm_kernels
    from fastvlm.serve import Engine, Limits
    from fastvlm.serve.app import Server, create_app
    from fastvlm.serve.server import DTYPES
    from fastvlm.vlm import FastVLM

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llm", default="0.5b", help="Qwen2 shapes (random weights): 0.5b (default), 1.5b, 7b, tiny")
    ap.add_argument("--dtype", default="float32", help="tower, projector and LLM dtype (float32, bfloat16)")
    ap.add_argument("--concurrency", default="1,4,16", help="comma-separated client counts (default 1,4,16)")
    ap.add_argument("--requests", type=int, default=None, help="requests per level (default max(4, 2 x clients))")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="tiny model, 128 px, 1,4 clients (CI smoke run)")
    ap.add_argument("--out", default=None, help="write <out>/<name>.json and .md")
    ap.add_argument("--name", default=None, help="file stem (default serving-<date>)")
    a = ap.parse_args(argv)
    if a.quick:
        a.llm, a.concurrency = "tiny", "1,4"
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = DTYPES[a.dtype]
    levels = [int(c) for c in a.concurrency.split(",")]

    print(f"[serving] building FastVLM with Qwen2-{a.llm} shapes (random weights), {a.dtype}", flush=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = FastVLM.from_config(a.llm, seed=0).to(dtype)
        acc_tower = copy.deepcopy(base.vision_tower)
        fastvlm_kernels.accelerate(acc_tower, backend=a.backend)
    size = base.image_size
    vlms = {"eager": base, "accelerated": FastVLM(acc_tower, base.projector, base.language_model, base.tokenizer,
                                                  image_size=size)}
    images = [_jpeg(size, s) for s in range(8)]
    name = f"fastvlm-{a.llm}"
    servers, ports = {}, {}
    for k, v in vlms.items():
        srv = Server(Engine(v, max_batch=a.max_batch, max_queue=256, max_wait_ms=10.0), name, Limits())
        us = uvicorn.Server(uvicorn.Config(create_app(srv), host="127.0.0.1", port=0, log_level="warning"))
        th = threading.Thread(target=us.run, daemon=True)
        th.start()
        while not us.started:
            time.sleep(0.02)
        servers[k], ports[k] = (srv, us, th), us.servers[0].sockets[0].getsockname()[1]
        print(f"[serving] {k}: warm-up request", flush=True)
        _request(ports[k], name, images[0], 2)

    rep = {"date": datetime.date.today().isoformat(), "machine": cpu_info(), "threads": torch.get_num_threads(),
           "torch": torch.__version__, "model": f"FastVLM, Qwen2-{a.llm} shapes, random weights", "image_size": size,
           "max_tokens": a.max_tokens, "dtype": a.dtype, "max_batch": a.max_batch,
           "backend": acc_tower.accelerated_backend,
           "command": "python -m bench.serving " + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
           "levels": []}
    for li, conc in enumerate(levels):
        n = a.requests or max(4, 2 * conc)
        lvl = {"concurrency": conc}
        order = ["eager", "accelerated"] if li % 2 == 0 else ["accelerated", "eager"]
        for k in order:
            eng = servers[k][0].engine
            before = dict(eng.stats["encode_batch"])
            print(f"[serving] {conc} clients, {n} requests, {k} tower", flush=True)
            r = run_level(ports[k], name, conc, n, images, a.max_tokens)
            r["encode_batches"] = {str(b): c - before.get(b, 0) for b, c in eng.stats["encode_batch"].items()
                                   if c - before.get(b, 0)}
            print(f"[serving]     {r['requests_per_s']:.3f} req/s, TTFT p50 {r['ttft_p50_s']:.2f} s, "
                  f"p99 {r['ttft_p99_s']:.2f} s; encoder batches {r['encode_batches']}", flush=True)
            lvl[k] = r
        rep["levels"].append(lvl)
    for srv, us, th in servers.values():
        us.should_exit = True
        th.join(10)
        srv.engine.shutdown()
    md = markdown(rep)
    print(md)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        stem = os.path.join(a.out, a.name or f"serving-{rep['date']}")
        with open(stem + ".json", "w") as f:
            json.dump(rep, f, indent=1)
        with open(stem + ".md", "w") as f:
            f.write(md)
        print(f"[serving] wrote {stem}.json and {stem}.md")
    return rep


if __name__ == "__main__":
    main()
