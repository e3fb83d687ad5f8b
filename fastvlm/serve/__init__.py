"""Serving FastVLM: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over a batching engine,
and the same app as a Ray Serve deployment.

- :mod:`fastvlm.serve.engine`: the request queue, batched image encoding, batched prefill and decode
  (no web dependency);
- :mod:`fastvlm.serve.protocol`: request validation, limits, images, the chat prompt;
- :mod:`fastvlm.serve.app`: the FastAPI app (``/v1/chat/completions``, ``/v1/models``, ``/health``);
- :mod:`fastvlm.serve.server`: loading, warm-up, uvicorn (``fastvlm serve``);
- :mod:`fastvlm.serve.ray_app`: the Ray Serve deployment (``fastvlm serve --ray``).

Needs FastAPI and uvicorn (the ``[serve]`` extra), and ``ray[serve]`` for Ray Serve (``[ray]``). See docs/serving.md.
"""
from .engine import Engine, EngineClosedError, QueueFullError, SamplingParams, Ticket
from .protocol import APIError, Limits

__all__ = ["Engine", "EngineClosedError", "QueueFullError", "SamplingParams", "Ticket",
           "APIError", "Limits"]
