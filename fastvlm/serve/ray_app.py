"""The same server as a Ray Serve deployment: replicas spread over a Ray cluster, Ray routes and scales.

Each replica loads the model, starts its own :class:`~fastvlm.serve.engine.Engine` and serves the app
of :mod:`fastvlm.serve.app` through Ray Serve's HTTP proxy, so a client sees the same API whichever
replica answers. Start it with ``fastvlm serve --ray --replicas N ...`` or with Ray's own CLI::

    serve run fastvlm.serve.ray_app:build model=random:0.5b replicas=2 cpus_per_replica=1

(every field of :class:`~fastvlm.serve.server.ServeOptions` can be given as ``key=value``; the
limits by their names in :class:`~fastvlm.serve.protocol.Limits`). ``max_replicas=M`` turns on Ray's
autoscaling between ``replicas`` and ``M``. Needs ``pip install 'ray[serve]'`` (the ``[ray]`` extra).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from ray import serve

from .app import create_app, set_process_server
from .protocol import Limits
from .server import ServeOptions, build_server

__all__ = ["FastVLMDeployment", "build", "deployment_for"]


@serve.deployment
@serve.ingress(create_app())
class FastVLMDeployment:
    """One replica: its own model and engine behind the shared app."""

    def __init__(self, options: dict):
        opts = ServeOptions.from_dict(options)
        self.server = build_server(opts)
        set_process_server(self.server)

    def __del__(self):
        server = getattr(self, "server", None)
        if server is not None:
            server.engine.shutdown(timeout=1.0)


def deployment_for(opts: ServeOptions, replicas: int = 1, cpus_per_replica: float = 1.0,
                   max_replicas: Optional[int] = None):
    """The bound application: ``replicas`` copies (or autoscaling up to ``max_replicas``), each
    reserving ``cpus_per_replica`` CPUs and running that many torch threads unless ``opts.threads``."""
    if replicas < 1 or (max_replicas is not None and max_replicas < replicas):
        raise ValueError(f"need 1 <= replicas <= max_replicas, got {replicas}, {max_replicas}")
    if opts.threads is None:
        opts = dataclasses.replace(opts, threads=max(1, int(cpus_per_replica)))
    scale = ({"autoscaling_config": {"min_replicas": replicas, "max_replicas": max_replicas,
                                     "target_ongoing_requests": max(1, opts.max_batch)}}
             if max_replicas is not None and max_replicas > replicas else {"num_replicas": replicas})
    # A replica admits up to max_batch + max_queue requests; Ray keeps the rest in its own queue.
    return FastVLMDeployment.options(ray_actor_options={"num_cpus": cpus_per_replica},
                                     max_ongoing_requests=opts.max_batch + opts.max_queue,
                                     **scale).bind(opts.as_dict())


def _coerce(field_type, value: str):
    t = str(field_type)
    if value.lower() in ("none", "null"):
        return None
    if "bool" in t:
        return value.lower() in ("1", "true", "yes", "on")
    if "int" in t:
        return int(value)
    if "float" in t:
        return float(value)
    return value


def build(args: dict):
    """The application builder for ``serve run fastvlm.serve.ray_app:build key=value ...``."""
    args = dict(args)
    replicas = int(args.pop("replicas", 1))
    cpus = float(args.pop("cpus_per_replica", 1))
    max_replicas = args.pop("max_replicas", None)
    opt_fields = {f.name: f.type for f in dataclasses.fields(ServeOptions)}
    lim_fields = {f.name: f.type for f in dataclasses.fields(Limits)}
    opts, lims = {}, {}
    for k, v in args.items():
        if k in opt_fields and k != "limits":
            opts[k] = _coerce(opt_fields[k], str(v))
        elif k in lim_fields:
            lims[k] = _coerce(lim_fields[k], str(v))
        else:
            raise ValueError(f"unknown option {k!r}; options: replicas, cpus_per_replica, max_replicas, "
                             f"{', '.join(sorted(set(opt_fields) - {'limits'}))}, {', '.join(sorted(lim_fields))}")
    return deployment_for(ServeOptions(**opts, limits=Limits(**lims)), replicas, cpus,
                          int(max_replicas) if max_replicas is not None else None)
