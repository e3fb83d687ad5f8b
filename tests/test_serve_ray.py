"""The server as a Ray Serve deployment: a local Ray with 2 CPUs, 2 replicas, the official openai
client through Ray's HTTP proxy. Each replica builds the same seeded random model, so every answer
equals FastVLM.generate's on a local copy, whichever replica gives it."""
import base64
import io
import json
import os
import socket
import urllib.request
import warnings

import pytest
import torch

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
from PIL import Image  # noqa: E402

from fastvlm.serve.server import ServeOptions, load_model  # noqa: E402

NAME = "fastvlm-random-tiny"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_server():
    from fastvlm.serve.ray_app import deployment_for
    port = _free_port()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = deployment_for(ServeOptions(model="random:tiny", backend="cpu", max_wait_ms=1), replicas=2,
                             cpus_per_replica=1)
        serve.run(app, name="fastvlm", route_prefix="/")
        yield port
    finally:
        serve.shutdown()
        ray.shutdown()


def test_ray_serve_two_replicas_answer_through_the_openai_client(ray_server):
    port = ray_server
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vlm = load_model("random:tiny", backend="cpu", progress=False)
    status = serve.status().applications["fastvlm"].deployments["FastVLMDeployment"]
    assert sum(status.replica_states.values()) == 2 and status.status == "HEALTHY", status
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
    assert [m.id for m in client.models.list().data] == [NAME]
    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        buf = io.BytesIO()
        Image.fromarray((torch.rand(48, 64, 3, generator=g) * 255).to(torch.uint8).numpy()).save(buf, "PNG")
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": f"picture {seed}"}]}]
        r = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=8, temperature=0)
        ref = vlm.generate([Image.open(io.BytesIO(buf.getvalue())).convert("RGB")], f"<image>\npicture {seed}",
                           max_new_tokens=8).texts[0]
        assert r.choices[0].message.content == ref
        parts = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model=NAME, messages=msgs, max_tokens=8, temperature=0, stream=True) if c.choices]
        assert "".join(parts) == ref
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=NAME, messages=[], max_tokens=8)
    # Ray routes to both replicas (each a process with its own model and engine)
    pids = set()
    for _ in range(40):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=30) as r:
            pids.add(json.load(r)["pid"])
        if len(pids) == 2:
            break
    assert len(pids) == 2, pids


def test_serve_run_builder_takes_options_and_refuses_unknown_ones():
    """`serve run fastvlm.serve.ray_app:build key=value ...`: options and limits by name, typed."""
    from fastvlm.serve import ray_app
    got = {}
    real = ray_app.deployment_for

    def capture(opts, replicas, cpus, max_replicas):
        got.update(opts=opts, replicas=replicas, cpus=cpus, max_replicas=max_replicas)
        return real(opts, replicas, cpus, max_replicas)
    ray_app.deployment_for = capture
    try:
        app = ray_app.build({"model": "random:tiny", "replicas": "2", "max_replicas": "4", "cpus_per_replica": "2",
                             "max_batch": "3", "max_wait_ms": "2.5", "allow_urls": "true", "image_dir": "/srv/img",
                             "api_key": "k", "dtype": "none"})
    finally:
        ray_app.deployment_for = real
    assert isinstance(app, serve.Application)
    o = got["opts"]
    assert (o.model, o.max_batch, o.max_wait_ms, o.api_key, o.dtype) == ("random:tiny", 3, 2.5, "k", None)
    assert o.limits.allow_urls is True and o.limits.image_dir == "/srv/img"
    assert (got["replicas"], got["cpus"], got["max_replicas"]) == (2, 2.0, 4)
    with pytest.raises(ValueError, match="unknown option 'colour'"):
        ray_app.build({"model": "random:tiny", "colour": "red"})
    with pytest.raises(ValueError, match="replicas"):
        ray_app.deployment_for(ServeOptions(), replicas=3, max_replicas=2)
