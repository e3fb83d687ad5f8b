"""The serving engine: a queue of requests, batched image encoding, batched prefill and decode.

One background thread owns the model. Each turn of its loop

1. admits waiting requests into free decode slots (``max_batch``). When nothing is decoding it waits
   up to ``max_wait_ms`` after the first arrival for more, so that concurrent requests share the
   work; while something decodes it takes only what is already queued;
2. encodes the images of all admitted requests in one vision-tower call (``max_encode_batch`` at a
   time), prefills their prompts together (left-padded), samples each one's first token, and merges
   their KV caches into the running batch (left-padding the shorter side);
3. runs one decode step for every running request, emits each one's new text, and drops the
   finished and the cancelled ones from the batch (their cache rows go with them).

A request's answer does not depend on what else is in flight: the vision tower is batch-invariant
bit for bit (each image is computed alone); prompts are masked, so padding contributes nothing; each
request samples from its own seeded generator. What batching can change is the order of floating-
point sums inside the LLM's matrix products, so logits agree with a single-request run to rounding
(about 1e-6 relative in float32), and greedy answers are the same unless two candidate tokens tie to
that precision.

Requests talk to the engine through a ``sink``: a callable that the engine thread calls with event
dicts (``token`` with a text delta, then ``done`` or ``error``). The first token always sends an
event, with empty text if it completes no character yet, so that a stream starts at the first token. The HTTP layer turns those into an
asyncio queue; tests can collect them directly.
"""
from __future__ import annotations

import itertools
import secrets
import sys
import threading
import time
import traceback
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Callable, Deque, Dict, List, Optional, Sequence

import torch

__all__ = ["Engine", "SamplingParams", "Ticket", "QueueFullError", "EngineClosedError"]


class QueueFullError(RuntimeError):
    """The engine's waiting queue is full; try again later (HTTP 429)."""


class EngineClosedError(RuntimeError):
    """The engine has been shut down."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0          # 0: greedy
    top_p: float = 1.0
    seed: Optional[int] = None        # None: a fresh random seed per request
    stop: Sequence[str] = ()          # stop strings; the answer ends before the first one
    ignore_eos: bool = False          # run to max_tokens through end-of-turn tokens (benchmarks)

    def __post_init__(self):
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive int, got {self.max_tokens!r}")
        if self.temperature < 0 or not (0 < self.top_p <= 1):
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}")
        if any(not isinstance(t, str) or not t for t in self.stop):
            raise ValueError("stop strings must be non-empty strings")


class Ticket:
    """A submitted request: ``cancel()`` frees its slot at the engine's next step."""

    def __init__(self, rid: str):
        self.id = rid
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


Sink = Callable[[dict], None]


@dataclass
class _Seq:
    ticket: Ticket
    prompt: str                       # the full templated text, with one <image> per image
    images: List[torch.Tensor]        # (3, S, S) each, preprocessed
    params: SamplingParams
    sink: Sink
    arrived: float
    gen: torch.Generator = None
    tokens: List[int] = field(default_factory=list)
    emitted: str = ""
    prompt_tokens: int = 0
    pos: int = 0                      # position id of the next token fed to the LLM
    last: int = 0                     # the last sampled token (the next decode input)
    admitted: float = 0.0
    encode_s: float = 0.0
    prefill_s: float = 0.0
    first_token_at: float = 0.0
    finished: Optional[str] = None    # finish reason once done
    reported: bool = False            # its done / error event has been sent


def _now() -> float:
    return time.perf_counter()


def _kv_pairs(cache) -> List[tuple]:
    """The per-layer (keys, values) tensors of a transformers KV cache, whatever its version."""
    if hasattr(cache, "layers"):                       # transformers >= 4.56
        return [(layer.keys, layer.values) for layer in cache.layers]
    if hasattr(cache, "key_cache"):                    # 4.50 - 4.55
        return list(zip(cache.key_cache, cache.value_cache))
    return [tuple(layer[:2]) for layer in cache]       # legacy tuples


def _cache_from(pairs: List[tuple]):
    from transformers.cache_utils import DynamicCache
    cache = DynamicCache()
    for i, (k, v) in enumerate(pairs):
        cache.update(k, v, i)
    return cache


def _left_pad(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    n = length - t.shape[dim]
    if n == 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t.new_zeros(shape), t], dim)


class Engine:
    """Serves one :class:`fastvlm.FastVLM` to many concurrent requests (see the module docstring).

    ``max_batch``: requests decoded together; ``max_queue``: requests waiting for a slot before
    :meth:`submit` raises :class:`QueueFullError`; ``max_wait_ms``: how long an idle engine waits after
    the first arrival for others to batch with; ``max_encode_batch``: images per vision-tower call."""

    def __init__(self, vlm, max_batch: int = 8, max_queue: int = 64, max_wait_ms: float = 10.0,
                 max_encode_batch: int = 16, name: str = "fastvlm"):
        from ..vlm import _cache_argument
        if max_batch < 1 or max_queue < 0 or max_encode_batch < 1 or max_wait_ms < 0:
            raise ValueError("Engine: need max_batch >= 1, max_queue >= 0, max_encode_batch >= 1, max_wait_ms >= 0")
        self.vlm, self.name = vlm, name
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_wait = max_wait_ms / 1e3
        self.max_encode_batch = max_encode_batch
        self._lm = vlm.language_model
        self._cache_kw = _cache_argument(self._lm)
        self._stop_ids = vlm._stop_ids()
        self._cv = threading.Condition()
        self._waiting: Deque[_Seq] = deque()
        self._running: List[_Seq] = []
        self._cache = None                # KV cache of the running batch (left-padded)
        self._mask: Optional[torch.Tensor] = None   # (B, T) 1 where a real token sits
        self._ids = itertools.count()
        self._closed = False
        #: what the engine did, for tests and the benchmark: vision-tower batch sizes (images per
        #: call), prefill and decode batch sizes (requests per forward), requests finished by reason.
        self.stats: Dict[str, Counter] = {"encode_batch": Counter(), "prefill_batch": Counter(),
                                          "decode_batch": Counter(), "finished": Counter()}
        self._thread = threading.Thread(target=self._loop, name=f"{name}-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------------- public
    @property
    def device(self) -> torch.device:
        return self.vlm.language_model.get_input_embeddings().weight.device

    def load(self) -> Dict[str, int]:
        with self._cv:
            return {"running": len(self._running), "waiting": len(self._waiting)}

    def submit(self, prompt: str, images: Sequence[torch.Tensor], params: SamplingParams, sink: Sink,
               request_id: Optional[str] = None) -> Ticket:
        """Queue a request. ``prompt``: the templated text with one ``<image>`` per image; ``images``:
        preprocessed (3, S, S) tensors. Events go to ``sink`` from the engine's thread."""
        from ..vlm import IMAGE_TOKEN
        n = prompt.count(IMAGE_TOKEN)
        if n != len(images):
            raise ValueError(f"the prompt has {n} {IMAGE_TOKEN} placeholders for {len(images)} images")
        ticket = Ticket(request_id or f"req-{next(self._ids)}")
        gen = torch.Generator(device=self.device)
        gen.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
        seq = _Seq(ticket, prompt, list(images), params, sink, _now(), gen)
        with self._cv:
            if self._closed:
                raise EngineClosedError("the engine is shut down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError(f"the queue is full ({self.max_queue} requests waiting); try again later")
            self._waiting.append(seq)
            self._cv.notify()
        return ticket

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the loop; requests still queued or running get an ``error`` event."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout)

    # --------------------------------------------------------------------------------------- loop
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._closed and not self._waiting and not self._running:
                    self._cv.wait()
                if self._closed:
                    break
                if not self._running and self._waiting:
                    # Idle: give concurrent arrivals a moment to join the first one's batch.
                    deadline = self._waiting[0].arrived + self.max_wait
                    while len(self._waiting) < self.max_batch and not self._closed:
                        left = deadline - _now()
                        if left <= 0:
                            break
                        self._cv.wait(left)
                new = []
                while self._waiting and len(self._running) + len(new) < self.max_batch:
                    s = self._waiting.popleft()
                    if s.ticket.cancelled:
                        self._finish(s, "cancelled")
                    else:
                        new.append(s)
            try:
                if new:
                    self._admit(new)
                self._drop_finished()
                if self._running:
                    self._step()
                    self._drop_finished()
            except Exception as e:     # keep serving: fail what was in flight, reset the batch
                traceback.print_exc(file=sys.stderr)
                for s in self._running + new:
                    if s.finished is None or s.finished == "error":
                        self._fail(s, 500, f"internal error while generating: {type(e).__name__}: {e}")
                    else:
                        self._finish(s, s.finished)
                self._running, self._cache, self._mask = [], None, None
        with self._cv:
            left = list(self._waiting) + self._running
            self._waiting.clear()
        for s in left:
            self._fail(s, 503, "the server is shutting down")
        self._running, self._cache, self._mask = [], None, None

    # ---------------------------------------------------------------------------------- admission
    @torch.no_grad()
    def _admit(self, new: List[_Seq]) -> None:
        vlm = self.vlm
        t0 = _now()
        for s in new:
            s.admitted = t0
        flat = [im for s in new for im in s.images]
        feats: List[torch.Tensor] = []
        for i in range(0, len(flat), self.max_encode_batch):
            chunk = torch.stack(flat[i:i + self.max_encode_batch])
            feats.extend(vlm.encode_images(chunk))
            self.stats["encode_batch"][chunk.shape[0]] += 1
        t1 = _now()
        seqs, embeds, k = [], [], 0
        for s in new:
            mine, k = feats[k:k + len(s.images)], k + len(s.images)
            s.images = []                  # the pixels are no longer needed
            s.encode_s = t1 - t0
            e = vlm._embed_apple(s.prompt, mine)
            if e.shape[0] == 0:
                self._fail(s, 400, "the prompt is empty")
                continue
            if e.shape[0] >= vlm.max_length:
                self._fail(s, 400, f"the prompt is {e.shape[0]} tokens (images included); the model's context "
                                   f"holds {vlm.max_length}")
                continue
            s.prompt_tokens = e.shape[0]
            seqs.append(s)
            embeds.append(e)
        if not seqs:
            return
        L = max(e.shape[0] for e in embeds)
        x = embeds[0].new_zeros(len(seqs), L, embeds[0].shape[1])
        mask = torch.zeros(len(seqs), L, dtype=torch.long, device=x.device)
        for i, e in enumerate(embeds):
            x[i, L - e.shape[0]:] = e
            mask[i, L - e.shape[0]:] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self._lm(inputs_embeds=x, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
        self.stats["prefill_batch"][len(seqs)] += 1
        t2 = _now()
        logits = out.logits[:, -1].float()
        for i, s in enumerate(seqs):
            s.prefill_s = t2 - t1
            s.pos = s.prompt_tokens
            s.first_token_at = _now()
            self._push(s, self._pick(s, logits[i]))
        self._merge(seqs, _kv_pairs(out[self._cache_kw]), mask)

    def _merge(self, seqs: List[_Seq], pairs: List[tuple], mask: torch.Tensor) -> None:
        if not self._running:
            self._running, self._cache, self._mask = seqs, _cache_from(pairs), mask
            return
        old = _kv_pairs(self._cache)
        T = max(mask.shape[1], self._mask.shape[1])
        merged = [(torch.cat([_left_pad(ko, T, 2), _left_pad(kn, T, 2)]),
                   torch.cat([_left_pad(vo, T, 2), _left_pad(vn, T, 2)])) for (ko, vo), (kn, vn) in zip(old, pairs)]
        self._cache = _cache_from(merged)
        self._mask = torch.cat([_left_pad(self._mask, T, 1), _left_pad(mask, T, 1)])
        self._running = self._running + seqs

    # ------------------------------------------------------------------------------------- decode
    @torch.no_grad()
    def _step(self) -> None:
        run = self._running
        dev = self._mask.device
        ids = torch.tensor([[s.last] for s in run], device=dev)
        pos = torch.tensor([[s.pos] for s in run], device=dev)
        self._mask = torch.cat([self._mask, self._mask.new_ones(len(run), 1)], 1)
        out = self._lm(input_ids=ids, attention_mask=self._mask, position_ids=pos, use_cache=True,
                       **{self._cache_kw: self._cache})
        self._cache = out[self._cache_kw]
        self.stats["decode_batch"][len(run)] += 1
        logits = out.logits[:, -1].float()
        for i, s in enumerate(run):
            s.pos += 1
            self._push(s, self._pick(s, logits[i]))

    def _pick(self, s: _Seq, logits: torch.Tensor) -> int:
        """The next token of one request: as FastVLM.generate picks it for a batch of one."""
        p = s.params
        if p.temperature == 0:
            return int(logits.argmax(-1))
        probs = torch.softmax(logits[None] / p.temperature, -1)
        if p.top_p < 1:
            sp, si = probs.sort(-1, descending=True)
            sp = sp * (sp.cumsum(-1) - sp < p.top_p)
            return int(si.gather(-1, torch.multinomial(sp, 1, generator=s.gen)))
        return int(torch.multinomial(probs, 1, generator=s.gen))

    def _push(self, s: _Seq, token: int) -> None:
        """Record one sampled token: emit the text it completes, end the request where it ends."""
        s.last = token
        if s.ticket.cancelled:
            s.finished = "cancelled"
            return
        if token in self._stop_ids and not s.params.ignore_eos:
            s.finished = "stop"
        else:
            s.tokens.append(token)
        text = self.vlm.tokenizer.decode(s.tokens, skip_special_tokens=True)
        cut = min((i for i in (text.find(t) for t in s.params.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, s.finished = text[:cut], "stop"
        elif s.finished is None and (len(s.tokens) >= s.params.max_tokens or s.pos + 1 >= self.vlm.max_length):
            s.finished = "length"
        if s.finished is None:
            # Hold back a partial UTF-8 character and any tail that may begin a stop string.
            if text.endswith("\ufffd"):
                return
            hold = max((n for t in s.params.stop for n in range(min(len(t) - 1, len(text)), 0, -1)
                        if text.endswith(t[:n])), default=0)
            text = text[:len(text) - hold]
        if text.startswith(s.emitted) and len(text) > len(s.emitted):
            self._emit(s, {"type": "token", "text": text[len(s.emitted):]})
            s.emitted = text
        elif len(s.tokens) == 1 and s.finished is None:
            self._emit(s, {"type": "token", "text": ""})    # the first token came, even if its text has not

    def _drop_finished(self) -> None:
        if not self._running:
            return
        for s in self._running:
            if s.finished is None and s.ticket.cancelled:
                s.finished = "cancelled"
        keep = [i for i, s in enumerate(self._running) if s.finished is None]
        if len(keep) == len(self._running):
            return
        for s in self._running:
            if s.finished is not None:
                self._finish(s, s.finished)
        if not keep:
            self._running, self._cache, self._mask = [], None, None
            return
        idx = torch.tensor(keep, device=self._mask.device)
        mask = self._mask.index_select(0, idx)
        first = int((mask.sum(0) > 0).nonzero()[0])      # columns that are padding for every survivor
        self._mask = mask[:, first:]
        self._cache = _cache_from([(k.index_select(0, idx)[:, :, first:], v.index_select(0, idx)[:, :, first:])
                                   for k, v in _kv_pairs(self._cache)])
        self._running = [self._running[i] for i in keep]

    # ------------------------------------------------------------------------------------- events
    def _emit(self, s: _Seq, event: dict) -> None:
        try:
            s.sink(event)
        except Exception:              # a broken sink is that request's problem, not the batch's
            s.ticket.cancel()

    def _finish(self, s: _Seq, reason: str) -> None:
        if s.reported:
            return
        s.finished, s.reported = reason, True
        self.stats["finished"][reason] += 1
        if reason == "cancelled":
            return
        first = s.first_token_at or _now()
        self._emit(s, {"type": "done", "finish_reason": reason, "text": s.emitted,
                       "prompt_tokens": s.prompt_tokens, "completion_tokens": len(s.tokens),
                       "timings": {"queue_s": s.admitted - s.arrived, "encode_s": s.encode_s,
                                   "prefill_s": s.prefill_s, "ttft_s": first - s.arrived,
                                   "total_s": _now() - s.arrived}})

    def _fail(self, s: _Seq, status: int, message: str) -> None:
        if s.reported:
            return
        s.finished, s.reported = "error", True
        self.stats["finished"]["error"] += 1
        self._emit(s, {"type": "error", "status": status, "message": message})
