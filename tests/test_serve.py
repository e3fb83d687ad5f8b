"""The OpenAI-compatible server (fastvlm.serve): a real uvicorn server on loopback, the official
``openai`` client and raw HTTP, against ``FastVLM.generate`` on the same tiny random model."""
import base64
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
import uvicorn  # noqa: E402
from PIL import Image  # noqa: E402

from fastvlm.serve import Engine, Limits, SamplingParams  # noqa: E402
from fastvlm.serve.app import Server, create_app  # noqa: E402
from fastvlm.serve.protocol import APIError, build_prompt  # noqa: E402
from fastvlm.serve.server import ServeOptions, load_model  # noqa: E402
from fastvlm.vlm import chat_prompt  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "test-key"
NAME = "fastvlm-random-tiny"


def _png(h, w, seed, fmt="PNG") -> bytes:
    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    return buf.getvalue()


def _uri(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def _image(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _serving(server: Server):
    port = _free_port()
    us = uvicorn.Server(uvicorn.Config(create_app(server), host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=us.run, daemon=True)
    th.start()
    t0 = time.time()
    while not us.started:
        assert th.is_alive() and time.time() - t0 < 30, "the server did not start"
        time.sleep(0.02)
    try:
        yield port
    finally:
        us.should_exit = True
        th.join(10)
        server.engine.shutdown()


@pytest.fixture(scope="module")
def vlm():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_model("random:tiny", backend="cpu", progress=False)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    (d / "cat.png").write_bytes(_png(90, 140, 7))
    outside = d.parent / "secret.png"
    outside.write_bytes(_png(20, 20, 8))
    os.symlink(outside, d / "link.png")       # a link that leads out of the directory
    return d


@pytest.fixture(scope="module")
def served(vlm, image_dir):
    limits = Limits(max_request_bytes=2 << 20, max_image_bytes=256 << 10, max_image_pixels=1_000_000, max_images=3,
                    max_tokens=100_000, default_max_tokens=16, image_dir=str(image_dir))
    server = Server(Engine(vlm, max_batch=4, max_queue=64, max_wait_ms=50), NAME, limits, KEY)
    with _serving(server) as port:
        yield server, port


def _client(port, key=KEY):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=120)


def _post(port, body, key=KEY, raw=None, path="/v1/chat/completions", method="POST"):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    conn.request(method, path, body=raw if raw is not None else (json.dumps(body) if body is not None else None),
                 headers=headers)
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, json.loads(data) if data else None


def _user(text, *images):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": u}} for u in images]
             + [{"type": "text", "text": text}]}]


def _ask(port, messages, **kw):
    kw.setdefault("max_tokens", 12)
    kw.setdefault("temperature", 0)
    r = _client(port).chat.completions.create(model=NAME, messages=messages, **kw)
    return r.choices[0].message.content, r


def _stream(port, messages, **kw):
    kw.setdefault("max_tokens", 12)
    kw.setdefault("temperature", 0)
    parts, finish, usage = [], None, None
    for ch in _client(port).chat.completions.create(model=NAME, messages=messages, stream=True,
                                                    stream_options={"include_usage": True}, **kw):
        if ch.choices:
            parts.append(ch.choices[0].delta.content or "")
            finish = ch.choices[0].finish_reason or finish
        if ch.usage:
            usage = ch.usage
    return "".join(parts), finish, usage


def _ref(vlm, images, prompt, n=12, **kw):
    return vlm.generate(images or None, prompt, max_new_tokens=n, **kw).texts[0]


def _good(port):
    """A good request after a bad one is still answered."""
    _, r = _ask(port, _user("still there?"), max_tokens=3)
    assert r.choices[0].finish_reason in ("stop", "length")


# ------------------------------------------------------------------------------------- prompts
def test_prompt_is_generates_prompt():
    """One image and one text: exactly FastVLM.generate's prompt; images first, text parts after a
    newline each (the HF checkpoints' template); a system message replaces the default."""
    p, imgs = build_prompt(_user("what is this?", "data:x"))
    assert p == chat_prompt("<image>\nwhat is this?") and imgs == [("data:x", "messages[0].content[0].image_url")]
    p, _ = build_prompt([{"role": "user", "content": [{"type": "text", "text": "a"},
                                                      {"type": "image_url", "image_url": {"url": "u"}}]}])
    assert p == chat_prompt("<image>\na")
    assert build_prompt([{"role": "user", "content": "hi"}])[0] == chat_prompt("hi")
    p, _ = build_prompt([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                         {"role": "assistant", "content": "hello"}, {"role": "user", "content": "and?"}])
    assert p == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
                 "hello<|im_end|>\n<|im_start|>user\nand?<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(APIError, match="placeholder"):
        build_prompt([{"role": "user", "content": "<image> sneaky"}])


# -------------------------------------------------------------------------------------- engine
def test_engine_batched_answers_equal_single_requests(vlm):
    """Requests batched together (mixed lengths, images, greedy, seeded sampling with top-p, ignore_eos)
    give the answers each gives alone through FastVLM.generate; the stream adds up to the answer."""
    g = torch.Generator().manual_seed(1)
    n = 18
    imgs = [torch.rand(3, 128, 128, generator=g) for _ in range(n + 1)]
    prompts = [("<image>\n" if i % 3 else "<image><image>\n") + "word " * (1 + i % 5) for i in range(n)]
    ims = [[imgs[i]] if i % 3 else [imgs[i], imgs[i + 1]] for i in range(n)]
    params = [SamplingParams(max_tokens=9 + i % 7, temperature=0.0 if i % 2 else 0.8, top_p=0.9 if i % 4 == 1 else 1.0,
                             seed=i, ignore_eos=i % 5 == 0) for i in range(n)]
    ref = [vlm.generate(ims[i], prompts[i], max_new_tokens=p.max_tokens, do_sample=p.temperature > 0,
                        temperature=p.temperature or 1.0, top_p=p.top_p, seed=p.seed, stop=not p.ignore_eos).texts[0]
           for i, p in enumerate(params)]
    eng = Engine(vlm, max_batch=5, max_wait_ms=30)
    events = [[] for _ in range(n)]
    done = threading.Semaphore(0)

    def sink(i):
        def f(ev):
            events[i].append(ev)
            if ev["type"] in ("done", "error"):
                done.release()
        return f
    try:
        for i in range(n):
            eng.submit(chat_prompt(prompts[i]), ims[i], params[i], sink(i))
            time.sleep(0.002 * (i % 4))
        for _ in range(n):
            assert done.acquire(timeout=60)
    finally:
        eng.shutdown()
    for i in range(n):
        last = events[i][-1]
        assert last["type"] == "done", last
        assert last["text"] == ref[i], i
        assert "".join(e["text"] for e in events[i] if e["type"] == "token") == ref[i]
    assert max(eng.stats["encode_batch"]) > 1 and max(eng.stats["decode_batch"]) > 1, eng.stats


def test_engine_rejects_mismatched_images(vlm):
    eng = Engine(vlm)
    try:
        with pytest.raises(ValueError, match="placeholders"):
            eng.submit(chat_prompt("<image>\nx"), [], SamplingParams(), lambda ev: None)
    finally:
        eng.shutdown()


# ------------------------------------------------------------------------------ the HTTP server
def test_models_and_health(served):
    server, port = served
    ids = [m.id for m in _client(port).models.list().data]
    assert ids == [NAME]
    assert _client(port).models.retrieve(NAME).id == NAME
    status, body = _post(port, None, key=None, path="/health", method="GET")
    assert status == 200 and body["status"] == "ok" and body["model"] == NAME and body["running"] == 0


def test_answers_equal_generate(served, vlm, image_dir):
    """Plain and streamed answers equal FastVLM.generate's: one image, two images, a file from the
    image directory, text only, seeded sampling, a stop string."""
    _, port = served
    a, b = _png(100, 150, 1), _png(64, 40, 2, "JPEG")
    cases = [(_user("what is this?", _uri(a)), [_image(a)], "<image>\nwhat is this?"),
             (_user("compare", _uri(a), _uri(b, "image/jpeg")), [_image(a), _image(b)], "<image><image>\ncompare"),
             (_user("and this file?", "cat.png"), [_image((image_dir / "cat.png").read_bytes())],
              "<image>\nand this file?"),
             ([{"role": "user", "content": "no picture"}], [], "no picture")]
    for messages, images, prompt in cases:
        ref = _ref(vlm, images, prompt)
        text, r = _ask(port, messages)
        assert text == ref, prompt
        assert r.usage.completion_tokens == len(vlm.tokenizer(ref, add_special_tokens=False)["input_ids"]) or \
            r.choices[0].finish_reason == "length"
        assert r.model_extra["timings"]["ttft_s"] > 0
        streamed, finish, usage = _stream(port, messages)
        assert streamed == ref and finish == r.choices[0].finish_reason and usage.total_tokens == r.usage.total_tokens
    # seeded sampling: the same as generate with that seed, and repeatable
    msgs, ims, prompt = cases[0]
    ref = _ref(vlm, ims, prompt, 10, do_sample=True, temperature=0.9, top_p=0.95, seed=5)
    assert _ask(port, msgs, max_tokens=10, temperature=0.9, top_p=0.95, seed=5)[0] == ref
    assert _stream(port, msgs, max_tokens=10, temperature=0.9, top_p=0.95, seed=5)[0] == ref
    # a stop string: the answer ends before it
    full = _ref(vlm, ims, prompt, 30)
    stop = full[4:6]
    text, r = _ask(port, msgs, max_tokens=30, stop=[stop])
    assert text == full[:full.index(stop)] and r.choices[0].finish_reason == "stop"
    assert _stream(port, msgs, max_tokens=30, stop=stop)[0] == text


def test_load_every_answer_arrives_once_and_equals_its_own(served, vlm):
    """64 requests from 8 concurrent clients: each answer equals that request's answer alone; none lost
    or duplicated; the encoder saw batches of several images."""
    server, port = served
    n = 64
    pngs = [_png(60 + i % 7 * 9, 80 + i % 5 * 11, 100 + i) for i in range(n)]
    qs = [f"question {i}: " + "why " * (i % 6) for i in range(n)]
    toks = [4 + i % 9 for i in range(n)]
    refs = [_ref(vlm, [_image(pngs[i])], "<image>\n" + qs[i], toks[i]) for i in range(n)]
    before = dict(server.engine.stats["encode_batch"])
    done_before = sum(server.engine.stats["finished"].values())

    def one(i):
        text, r = _ask(port, _user(qs[i], _uri(pngs[i])), max_tokens=toks[i])
        return i, text, r.id

    with ThreadPoolExecutor(8) as ex:
        out = list(ex.map(one, range(n)))
    assert sorted(i for i, _, _ in out) == list(range(n))
    assert len({rid for _, _, rid in out}) == n
    for i, text, _ in out:
        assert text == refs[i], i
    assert sum(server.engine.stats["finished"].values()) - done_before == n
    new = {k: v - before.get(k, 0) for k, v in server.engine.stats["encode_batch"].items() if v - before.get(k, 0)}
    assert max(new) > 1, new
    assert sum(k * v for k, v in new.items()) == n


def _bad(port, body=None, status=400, key=KEY, raw=None, match=None, param=None):
    got, err = _post(port, body, key=key, raw=raw)
    assert got == status, (got, err)
    assert set(err["error"]) == {"message", "type", "param", "code"}, err
    if match:
        assert match in err["error"]["message"], err
    if param:
        assert err["error"]["param"] == param, err
    _good(port)
    return err["error"]


def test_bad_requests_get_4xx_and_the_server_keeps_serving(served, image_dir):
    _, port = served
    ok_img = _uri(_png(30, 30, 3))
    _bad(port, raw=b"{not json", match="not valid JSON")
    _bad(port, raw=b"[1, 2]", match="JSON object")
    _bad(port, {"model": NAME}, match="messages", param="messages")
    _bad(port, {"model": NAME, "messages": []}, param="messages")
    _bad(port, {"model": NAME, "messages": [{"role": "robot", "content": "x"}]}, param="messages[0].role")
    _bad(port, {"model": NAME, "messages": _user("x", "data:image/png;base64," + base64.b64encode(b"not an image").decode())},
         match="cannot read the image", param="messages[0].content[0].image_url")
    _bad(port, {"model": NAME, "messages": _user("x", "data:image/png;base64,@@@")}, match="base64")
    _bad(port, {"model": NAME, "messages": _user("x", _uri(os.urandom(300 << 10)))}, status=413, match="limit")
    flat = io.BytesIO()
    Image.new("RGB", (1100, 1000)).save(flat, "PNG")        # a few KB that decode to 1.1 M pixels
    _bad(port, {"model": NAME, "messages": _user("x", _uri(flat.getvalue()))}, status=413, match="pixels")
    _bad(port, {"model": NAME, "messages": _user("x", "../secret.png")}, status=403, match="outside")
    _bad(port, {"model": NAME, "messages": _user("x", "link.png")}, status=403, match="outside")
    _bad(port, {"model": NAME, "messages": _user("x", "/etc/passwd")}, status=403)
    _bad(port, {"model": NAME, "messages": _user("x", "file:///etc/hostname")}, status=403)
    _bad(port, {"model": NAME, "messages": _user("x", "missing.png")}, match="no image file")
    _bad(port, {"model": NAME, "messages": _user("x", "http://127.0.0.1:9/cat.png")}, match="URLs are disabled")
    _bad(port, {"model": NAME, "messages": _user("x", *[ok_img] * 4)}, match="too many images")
    _bad(port, {"model": NAME, "messages": _user("x"), "max_tokens": 0}, param="max_tokens")
    _bad(port, {"model": NAME, "messages": _user("x"), "max_tokens": 200_000}, param="max_tokens")
    _bad(port, {"model": NAME, "messages": _user("x"), "temperature": -1}, param="temperature")
    _bad(port, {"model": NAME, "messages": _user("x"), "top_p": 0}, param="top_p")
    _bad(port, {"model": NAME, "messages": _user("x"), "stop": [""]}, param="stop")
    _bad(port, {"model": NAME, "messages": _user("x"), "n": 2}, param="n")
    _bad(port, {"model": "gpt-4", "messages": _user("x")}, status=404, param="model")
    _bad(port, {"model": NAME, "messages": _user("x")}, status=401, key="wrong")
    _bad(port, {"model": NAME, "messages": _user("x")}, status=401, key=None)
    _bad(port, raw=b'{"messages": "' + b"x" * (3 << 20) + b'"}', status=413, match="limit")
    got, err = _post(port, None, path="/v1/nothing", method="GET")
    assert got == 404 and "error" in err
    with pytest.raises(openai.AuthenticationError):
        _client(port, "wrong").models.list()


def test_url_images_when_enabled(vlm):
    """--allow-image-urls: an http URL is fetched (a local HTTP server here), within the byte limit."""
    import http.server
    data = _png(50, 70, 9)

    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = data if self.path == "/a.png" else os.urandom(30000)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    server = Server(Engine(vlm), NAME, Limits(allow_urls=True, max_image_bytes=20000), None)
    try:
        with _serving(server) as port:
            text, _ = _ask(port, _user("url?", base + "/a.png"))
            assert text == _ref(vlm, [_image(data)], "<image>\nurl?")
            got, err = _post(port, {"messages": _user("x", base + "/big")}, key=None)
            assert got == 413, err
    finally:
        httpd.shutdown()


def _open_stream(port, max_tokens):
    """A raw streaming request; returns the connection after its first content chunk arrived."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    body = {"model": NAME, "messages": _user("go on"), "stream": True, "max_tokens": max_tokens, "ignore_eos": True,
            "temperature": 0}
    conn.request("POST", "/v1/chat/completions", json.dumps(body),
                 {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    r = conn.getresponse()
    assert r.status == 200
    while b"content" not in r.fp.readline():
        pass
    return conn


def _wait(cond, timeout=20.0):
    t0 = time.time()
    while not cond():
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.05)


def test_disconnect_mid_stream_frees_the_slot(served):
    server, port = served
    cancelled = server.engine.stats["finished"]["cancelled"]
    conn = _open_stream(port, 50_000)
    assert server.engine.load()["running"] == 1
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    _wait(lambda: server.engine.load()["running"] == 0)
    assert server.engine.stats["finished"]["cancelled"] == cancelled + 1
    _good(port)


def test_full_queue_gets_429_then_serves(vlm):
    """One slot and a queue of one: a third request gets 429 with Retry-After; once the first client
    leaves, the queued one is answered and new ones are served."""
    server = Server(Engine(vlm, max_batch=1, max_queue=1, max_wait_ms=0), NAME,
                    Limits(max_tokens=100_000), KEY)
    with _serving(server) as port:
        conn = _open_stream(port, 50_000)                    # holds the one slot
        queued = ThreadPoolExecutor(1).submit(_ask, port, _user("queued"), max_tokens=3)
        _wait(lambda: server.engine.load()["waiting"] == 1)
        got, body = _post(port, {"model": NAME, "messages": _user("x")})
        assert got == 429 and body["error"]["type"] == "rate_limit_error", body
        with pytest.raises(openai.RateLimitError):
            _ask(port, _user("x"))
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        text, r = queued.result(timeout=60)
        assert r.choices[0].finish_reason in ("stop", "length")
        _good(port)


def test_cli_serve_subprocess(tmp_path):
    """`fastvlm serve` as users start it: binds loopback, answers with the API key, stops on SIGINT."""
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), FASTVLM_API_KEY=KEY)
    p = subprocess.Popen([sys.executable, "-m", "fastvlm", "serve", "--model", "random:tiny", "--port", str(port),
                          "--max-wait-ms", "1"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.time()
        while True:
            assert p.poll() is None, p.stderr.read()
            assert time.time() - t0 < 120, "the server did not come up"
            try:
                if _post(port, None, key=None, path="/health", method="GET")[0] == 200:
                    break
            except OSError:
                time.sleep(0.2)
        text, r = _ask(port, _user("hi", _uri(_png(40, 40, 1))), max_tokens=4)
        assert r.model == NAME and r.usage.completion_tokens <= 4
        assert _post(port, {"messages": _user("x")}, key=None)[0] == 401
    finally:
        p.send_signal(signal.SIGINT)
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            raise
    err = p.stderr.read()
    assert "serving on http://127.0.0.1:" in err, err


def test_engine_survives_a_failing_forward(vlm):
    """An LLM call that raises fails the requests in flight with a 500 event; the next is served."""
    eng = Engine(vlm, max_wait_ms=0)
    real, calls = eng._lm, []

    def flaky(*args, **kw):
        calls.append(1)
        if len(calls) == 2:                 # the first decode step
            raise RuntimeError("injected failure")
        return real(*args, **kw)
    eng._lm = flaky
    try:
        for expect in ("error", "done"):
            got, ev = [], threading.Event()

            def sink(e):
                got.append(e)
                if e["type"] in ("done", "error"):
                    ev.set()
            eng.submit(chat_prompt("<image>\nx"), [torch.rand(3, 128, 128)], SamplingParams(max_tokens=5, ignore_eos=True), sink)
            assert ev.wait(30)
            assert got[-1]["type"] == expect, got
            assert sum(e["type"] in ("done", "error") for e in got) == 1
        assert got[-1]["completion_tokens"] >= 1 and "injected failure" not in str(got)
    finally:
        eng.shutdown()
