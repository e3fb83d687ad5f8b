"""The OpenAI-compatible HTTP API (FastAPI): ``POST /v1/chat/completions``, ``GET /v1/models``,
``GET /health``.

:func:`create_app` builds the app around a :class:`Server` (an :class:`~fastvlm.serve.engine.Engine`
plus its limits and name). Without one, the app serves the server installed in this process with
:func:`set_process_server`: that is how each Ray Serve replica fills the same app with its own model.
"""

import asyncio
import hmac
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import List, Optional

from .engine import Engine, EngineClosedError, QueueFullError
from .protocol import APIError, Limits, load_image, parse_chat_request

__all__ = ["Server", "create_app", "set_process_server"]


@dataclass
class Server:
    engine: Engine
    model_name: str
    limits: Limits = field(default_factory=Limits)
    api_key: Optional[str] = None
    created: int = field(default_factory=lambda: int(time.time()))

    def preprocess(self, refs) -> List:
        """Load and preprocess a request's images (blocking; run it off the event loop)."""
        from ..preprocess import preprocess
        vlm = self.engine.vlm
        pix = []
        for url, param in refs:
            im = load_image(url, self.limits, param)
            pix.append(preprocess(im, size=vlm.image_size, pad_to_square=vlm.pad_to_square)[0])
        return pix


_PROCESS_SERVER: Optional[Server] = None


def set_process_server(server: Optional[Server]) -> None:
    """Install the server that apps built without one serve (one per process, e.g. a Ray replica)."""
    global _PROCESS_SERVER
    _PROCESS_SERVER = server


def process_server() -> Optional[Server]:
    """The server installed with :func:`set_process_server`. (A module-level function, so that an app
    pickled into a Ray replica finds the replica's server, not a copy of this module's globals.)"""
    return _PROCESS_SERVER


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


async def _read_body(request, cap: int) -> bytes:
    n = request.headers.get("content-length")
    if n is not None and n.isdigit() and int(n) > cap:
        raise APIError(413, f"the request body is {int(n)} bytes, more than the limit of {cap}", None,
                       "request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            raise APIError(413, f"the request body is more than the limit of {cap} bytes", None, "request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(server: Optional[Server] = None):
    """The FastAPI app. ``server=None``: serve the process's server (:func:`set_process_server`)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException

    app = FastAPI(title="FastVLM", description="OpenAI-compatible chat completions for FastVLM (fastvlm-kernels)")

    def current() -> Server:
        srv = server or process_server()
        if srv is None:
            raise APIError(503, "the model is not loaded yet", None, "not_ready")
        return srv

    def authorise(srv: Server, request) -> None:
        if srv.api_key is None:
            return
        got = request.headers.get("authorization", "")
        scheme, _, token = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), srv.api_key.encode()):
            raise APIError(401, "invalid or missing API key (send Authorization: Bearer <key>)", None,
                           "invalid_api_key")

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        headers = {"Retry-After": "1"} if exc.status == 429 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(HTTPException)
    async def _http_error(request, exc):
        return JSONResponse(APIError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc):
        return JSONResponse(APIError(400, f"invalid request: {exc.errors()}").body(), status_code=400)

    @app.get("/health")
    async def health():
        srv = current()
        return {"status": "ok", "model": srv.model_name, "pid": os.getpid(), **srv.engine.load()}

    def model_card(srv: Server) -> dict:
        return {"id": srv.model_name, "object": "model", "created": srv.created, "owned_by": "fastvlm-kernels"}

    @app.get("/v1/models")
    async def models(request: Request):
        srv = current()
        authorise(srv, request)
        return {"object": "list", "data": [model_card(srv)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        srv = current()
        authorise(srv, request)
        if model_id != srv.model_name:
            raise APIError(404, f"the model {model_id!r} does not exist; this server serves {srv.model_name!r}",
                           "model", "model_not_found")
        return model_card(srv)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        srv = current()
        authorise(srv, request)
        raw = await _read_body(request, srv.limits.max_request_bytes)
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}") from None
        req = parse_chat_request(body, srv.limits)
        if req.model is not None and req.model != srv.model_name:
            raise APIError(404, f"the model {req.model!r} does not exist; this server serves {srv.model_name!r}",
                           "model", "model_not_found")
        pixels = await asyncio.to_thread(srv.preprocess, req.image_refs) if req.image_refs else []

        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        try:
            ticket = srv.engine.submit(req.prompt, pixels, req.params,
                                       lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev), rid)
        except QueueFullError as e:
            raise APIError(429, str(e), None, "queue_full") from None
        except EngineClosedError as e:
            raise APIError(503, str(e), None, "shutting_down") from None

        async def next_event():
            """The engine's next event, or None once the client has gone (its slot is then freed)."""
            while True:
                try:
                    return await asyncio.wait_for(events.get(), 0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        ticket.cancel()
                        return None

        created = int(time.time())
        try:
            first = await next_event()
        except BaseException:
            ticket.cancel()
            raise
        if first is None:
            return Response(status_code=499)
        if first["type"] == "error":
            raise APIError(first["status"], first["message"])

        def usage(done: dict) -> dict:
            return {"prompt_tokens": done["prompt_tokens"], "completion_tokens": done["completion_tokens"],
                    "total_tokens": done["prompt_tokens"] + done["completion_tokens"]}

        if not req.stream:
            ev = first
            while ev is not None and ev["type"] == "token":
                ev = await next_event()
            if ev is None:
                return Response(status_code=499)
            if ev["type"] == "error":
                raise APIError(ev["status"], ev["message"])
            return {"id": rid, "object": "chat.completion", "created": created, "model": srv.model_name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": ev["text"]},
                                 "finish_reason": ev["finish_reason"], "logprobs": None}],
                    "usage": usage(ev), "timings": ev["timings"]}

        def chunk(delta: dict, finish=None, **extra) -> str:
            return _sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": srv.model_name,
                         "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
                         **extra})

        async def stream():
            try:
                yield chunk({"role": "assistant", "content": ""})
                ev = first
                while True:
                    if ev["type"] == "token":
                        if ev["text"]:
                            yield chunk({"content": ev["text"]})
                    elif ev["type"] == "done":
                        yield chunk({}, ev["finish_reason"], timings=ev["timings"])
                        if req.include_usage:
                            yield _sse({"id": rid, "object": "chat.completion.chunk", "created": created,
                                        "model": srv.model_name, "choices": [], "usage": usage(ev)})
                        break
                    else:
                        yield _sse(APIError(ev["status"], ev["message"]).body())
                        break
                    ev = await events.get()
                yield "data: [DONE]\n\n"
            finally:            # the client went away, or the answer is complete: free the slot
                ticket.cancel()

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app
