"""OpenAI chat-completions requests: validation, limits, images, and the prompt they make.

Everything here is plain Python (no web framework), so the HTTP layer and the tests share it. Each
problem raises :class:`APIError` with the HTTP status and an OpenAI-style error body that names the
offending parameter.
"""
from __future__ import annotations

import base64
import binascii
import io
import os
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

from ..vlm import IMAGE_TOKEN, SYSTEM_PROMPT
from .engine import SamplingParams

__all__ = ["APIError", "Limits", "ParsedRequest", "parse_chat_request", "load_image", "build_prompt"]


class APIError(Exception):
    """An error answered with ``status`` and an OpenAI-style body."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
             404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
             422: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


@dataclass
class Limits:
    """What one request may ask for. The defaults suit one FastVLM on one machine."""
    max_request_bytes: int = 32 << 20       # the HTTP body (base64 images included)
    max_image_bytes: int = 16 << 20         # one image file, encoded
    max_image_pixels: int = 40_000_000      # width x height of one image, checked before decoding
    max_images: int = 4                     # images per request
    max_tokens: int = 2048                  # the largest max_tokens a request may ask for
    default_max_tokens: int = 512           # when a request gives none
    max_messages: int = 256
    max_stop: int = 4                       # stop strings per request (as OpenAI)
    image_dir: Optional[str] = None         # local image files are read from here only; None: refused
    allow_urls: bool = False                # fetch http(s) image URLs
    url_timeout_s: float = 10.0


@dataclass
class ParsedRequest:
    model: Optional[str]
    prompt: str                              # chat-templated, one <image> per image
    image_refs: List[Tuple[str, str]]        # (url, param path) in prompt order
    params: SamplingParams
    stream: bool = False
    include_usage: bool = False
    extra: dict = field(default_factory=dict)


def _num(body: dict, key: str, kind, lo=None, hi=None, default=None, lo_open=False):
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, kind):
        name = "an integer" if kind is int else "a number"
        raise APIError(400, f"'{key}' must be {name}, got {type(v).__name__}", key)
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise APIError(400, f"'{key}' must be {'>' if lo_open else '>='} {lo}, got {v}", key)
    if hi is not None and v > hi:
        raise APIError(400, f"'{key}' must be <= {hi}, got {v}", key)
    return v


def _no_placeholder(text: str, param: str) -> None:
    if IMAGE_TOKEN in text:
        raise APIError(400, f"message text cannot contain the image placeholder {IMAGE_TOKEN!r}; send images as "
                            "image_url content parts", param)


def _content_parts(content, where: str) -> List[dict]:
    if isinstance(content, str):
        _no_placeholder(content, f"{where}.content")
        return [{"type": "text", "text": content}]
    if content is None:
        return []
    if not isinstance(content, list):
        raise APIError(400, f"{where}.content must be a string or a list of content parts", f"{where}.content")
    parts = []
    for j, p in enumerate(content):
        pw = f"{where}.content[{j}]"
        if not isinstance(p, dict) or not isinstance(p.get("type"), str):
            raise APIError(400, f"{pw} must be an object with a 'type'", pw)
        t = p["type"]
        if t == "text":
            if not isinstance(p.get("text"), str):
                raise APIError(400, f"{pw}.text must be a string", f"{pw}.text")
            _no_placeholder(p["text"], f"{pw}.text")
            parts.append({"type": "text", "text": p["text"]})
        elif t == "image_url":
            iu = p.get("image_url")
            url = iu.get("url") if isinstance(iu, dict) else iu
            if not isinstance(url, str) or not url:
                raise APIError(400, f"{pw}.image_url.url must be a non-empty string", f"{pw}.image_url")
            parts.append({"type": "image", "url": url, "param": f"{pw}.image_url"})
        else:
            raise APIError(400, f"{pw}: content type {t!r} is not supported (text, image_url)", f"{pw}.type")
    return parts


def build_prompt(messages: Sequence[dict], system: str = SYSTEM_PROMPT) -> Tuple[str, List[Tuple[str, str]]]:
    """The qwen_2 chat template of FastVLM over OpenAI ``messages``, ending with the assistant's turn.

    A user turn puts its images first (``<image>`` each) and then its text parts, each after a
    newline, as the HF FastVLM checkpoints' chat template does; a turn without images has its text
    parts joined by newlines, as ``predict.py`` writes a question. A single user turn of one image and
    one text is thus exactly ``FastVLM.generate``'s prompt for ``"<image>\\n" + text``. A system message
    replaces the default system prompt. Returns the text and the (url, param) of each image."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list", "messages")
    out, images = [], []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise APIError(400, f"{where} must be an object", where)
        role = m.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise APIError(400, f"{where}.role must be system, user or assistant, got {role!r}", f"{where}.role")
        parts = _content_parts(m.get("content"), where)
        texts = [p["text"] for p in parts if p["type"] == "text"]
        imgs = [p for p in parts if p["type"] == "image"]
        if role in ("system", "developer"):
            if imgs:
                raise APIError(400, f"{where}: a system message cannot hold images", f"{where}.content")
            if i == 0:
                system = "\n".join(texts)
                continue
        if imgs and role != "user":
            raise APIError(400, f"{where}: only user messages may hold images", f"{where}.content")
        for p in imgs:
            images.append((p["url"], p["param"]))
        body = IMAGE_TOKEN * len(imgs) + ("".join("\n" + t for t in texts) if imgs else "\n".join(texts))
        out.append(f"<|im_start|>{'system' if role == 'developer' else role}\n{body}<|im_end|>\n")
    if not out:
        raise APIError(400, "'messages' holds no user message", "messages")
    return f"<|im_start|>system\n{system}<|im_end|>\n" + "".join(out) + "<|im_start|>assistant\n", images


def parse_chat_request(body, limits: Limits) -> ParsedRequest:
    """Validate a decoded JSON body of ``POST /v1/chat/completions``."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise APIError(400, "'model' must be a string", "model")
    msgs = body.get("messages")
    if isinstance(msgs, list) and len(msgs) > limits.max_messages:
        raise APIError(400, f"too many messages ({len(msgs)}; at most {limits.max_messages})", "messages")
    prompt, images = build_prompt(msgs)
    if len(images) > limits.max_images:
        raise APIError(400, f"too many images ({len(images)}; at most {limits.max_images} per request)", "messages")
    if body.get("n", 1) != 1:
        raise APIError(400, "only n=1 is supported", "n")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _num(body, key, int, 1, limits.max_tokens, limits.default_max_tokens)
    temperature = float(_num(body, "temperature", (int, float), 0, 2, 1.0))
    top_p = float(_num(body, "top_p", (int, float), 0, 1, 1.0, lo_open=True))
    seed = _num(body, "seed", int, -(1 << 63), (1 << 63) - 1)
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise APIError(400, "'stop' must be a non-empty string or a list of them", "stop")
    if len(stop) > limits.max_stop:
        raise APIError(400, f"at most {limits.max_stop} stop strings", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, "'stream' must be a boolean", "stream")
    so = body.get("stream_options") or {}
    if not isinstance(so, dict):
        raise APIError(400, "'stream_options' must be an object", "stream_options")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise APIError(400, "'ignore_eos' must be a boolean", "ignore_eos")
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                            stop=tuple(stop), ignore_eos=ignore_eos)
    return ParsedRequest(model, prompt, images, params, stream, bool(so.get("include_usage", False)))


# ----------------------------------------------------------------------------------------- images
def _size(n: int) -> str:
    return f"{n / (1 << 20):g} MiB" if n >= 1 << 20 else f"{n} bytes"


def _read_capped(f, cap: int, what: str, param: str) -> bytes:
    data = f.read(cap + 1)
    if len(data) > cap:
        raise APIError(413, f"{what} is larger than the limit of {_size(cap)} per image", param, "image_too_large")
    return data


def _image_bytes(url: str, limits: Limits, param: str) -> bytes:
    if url.startswith("data:"):
        head, sep, payload = url.partition(",")
        if not sep or not head.endswith(";base64"):
            raise APIError(400, "an image data URI must be base64: data:image/<type>;base64,<data>", param)
        if len(payload) * 3 // 4 > limits.max_image_bytes + 3:
            raise APIError(413, f"the image is larger than the limit of {_size(limits.max_image_bytes)} per image",
                           param, "image_too_large")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise APIError(400, "the image data URI is not valid base64", param) from None
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme in ("http", "https"):
        if not limits.allow_urls:
            raise APIError(400, "image URLs are disabled on this server; send the image as a base64 data URI "
                                "(the operator can enable URLs with --allow-image-urls)", param, "urls_disabled")
        try:
            req = urllib.request.Request(url, headers={"User-Agent": "fastvlm-serve"})
            with urllib.request.urlopen(req, timeout=limits.url_timeout_s) as r:
                return _read_capped(r, limits.max_image_bytes, "the image at that URL", param)
        except APIError:
            raise
        except Exception as e:
            raise APIError(400, f"cannot fetch the image URL: {type(e).__name__}: {e}", param) from None
    if scheme in ("", "file"):
        if limits.image_dir is None:
            raise APIError(400, "local image files are disabled on this server; send the image as a base64 data "
                                "URI (the operator can allow a directory with --image-dir)", param, "files_disabled")
        path = urllib.parse.unquote(urllib.parse.urlsplit(url).path) if scheme == "file" else url
        root = os.path.realpath(limits.image_dir)
        full = os.path.realpath(os.path.join(root, path))      # an absolute path replaces root
        if os.path.commonpath([root, full]) != root:
            raise APIError(403, "that image path is outside the directory this server reads images from", param,
                           "path_not_allowed")
        if not os.path.isfile(full):
            raise APIError(400, f"no image file {path!r} in the server's image directory", param, "file_not_found")
        with open(full, "rb") as f:
            return _read_capped(f, limits.max_image_bytes, "the image file", param)
    raise APIError(400, f"unsupported image URL scheme {scheme!r} (data:, and file paths or http(s) where enabled)",
                   param)


def load_image(url: str, limits: Limits, param: str = "image_url"):
    """The RGB PIL image at ``url`` (a data URI, a path in ``limits.image_dir`` or, where enabled, an
    http(s) URL), within the size limits. Blocking: run it off the event loop."""
    from PIL import Image
    data = _image_bytes(url, limits, param)
    try:
        im = Image.open(io.BytesIO(data))
        w, h = im.size                         # from the header, before any pixel is decoded
    except Exception as e:
        raise APIError(400, f"cannot read the image: {type(e).__name__}: {e}", param, "invalid_image") from None
    if w * h > limits.max_image_pixels:
        raise APIError(413, f"the image is {w}x{h} = {w * h} pixels, more than the limit of {limits.max_image_pixels}",
                       param, "image_too_large")
    try:
        im.load()
        return im.convert("RGB")
    except Exception as e:
        raise APIError(400, f"cannot decode the image: {type(e).__name__}: {e}", param, "invalid_image") from None
