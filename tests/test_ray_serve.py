"""The service on Ray Serve (deploy/ray_serve.py): a local Ray instance, two replicas of a tiny
real model behind Ray's HTTP proxy on 127.0.0.1, one replica's process killed mid-load.

Everything on the path is real: Ray's controller, proxy and replica processes, the app's own
lifespan loading the model inside each replica, HTTP over loopback, the project's retrying client.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import os
import signal
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

ray = pytest.importorskip("ray", reason="ray[serve] is not installed (pip install -e '.[ray]')")
psutil = pytest.importorskip("psutil")

from ray import serve  # noqa: E402

from clients.client import RewardClient  # noqa: E402
from clients.local import free_port  # noqa: E402
from deploy.ray_serve import RayServeOptions, build, ray_environment  # noqa: E402
from service.config import Settings  # noqa: E402
from tests.conftest import asgi_client  # noqa: E402
from tests.tiny import WORDS  # noqa: E402

HH = "\n\nHuman: what should i cook tonight\n\nAssistant:"
APP = "logand"


def replica_processes() -> list[Any]:
    """Serve replica processes of the Ray instance this test started (our descendants only)."""
    return [p for p in psutil.Process().children(recursive=True)
            if p.is_running() and p.name().startswith("ray::ServeReplica")]


@pytest.fixture(scope="module")
def ray_url() -> Iterator[str]:
    """A local Ray instance with Serve's proxy on a free loopback port; shut down afterwards."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in ray_environment().items():  # inherited by Ray's processes at start
            mp.setenv(key, value)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def expected_scores(settings: Settings, pairs: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """The same settings served in-process (no Ray): what every replica must answer."""
    async def run() -> list[dict[str, Any]]:
        async for client in asgi_client(settings):
            r = await client.post("/v1/score", json={"items": [{"prompt": p, "response": q} for p, q in pairs]})
            assert r.status_code == 200, r.text
            return list(r.json()["results"])
        raise AssertionError("no client")

    return asyncio.run(run())


class RecordingTransport(httpx.HTTPTransport):
    """A real HTTP transport that also notes every status it receives (to see the retries)."""

    def __init__(self) -> None:
        super().__init__()
        self.statuses: list[tuple[int, str]] = []
        self._lock = threading.Lock()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        if response.status_code != 200:
            response.read()
            with self._lock:
                self.statuses.append((response.status_code, response.text))
        return response


def test_replica_killed_mid_load_every_request_answered_and_replica_replaced(
        ray_url: str, tiny_bert: Path) -> None:
    settings = Settings.model_validate({
        "models": [{"name": "m", "path": str(tiny_bert), "device": "cpu", "dtype": "float32",
                    "reference": {"type": "constant", "value": 0.25}}],
        "engine": {"max_wait_ms": 1, "threads": 1},
    })
    serve.run(build(RayServeOptions(min_replicas=2, max_replicas=2, num_cpus=0.5), settings),
              name=APP, route_prefix="/")
    try:
        check_kill_and_replace(ray_url, settings)
    finally:
        serve.delete(APP)


def check_kill_and_replace(ray_url: str, settings: Settings) -> None:
    # The app's lifespan ran inside the replicas: /ready is 200 only after models load and warm up.
    ready = httpx.get(ray_url + "/ready", timeout=10)
    assert ready.status_code == 200 and ready.json()["models"] == ["m"], ready.text
    before = {p.pid for p in replica_processes()}
    assert len(before) == 2

    responses = [" ".join(WORDS[i: i + 3 + i % 5]) for i in range(40)]
    pairs = [(HH, r) for r in responses]
    expected = expected_scores(settings, pairs)
    requests = [[(i + k) % len(pairs) for k in range(24)] for i in range(60)]  # item indices per request

    transport = RecordingTransport()
    done = 0
    done_lock = threading.Lock()
    with RewardClient(ray_url, transport=transport, max_retries=8, max_backoff_s=4) as client:
        def one(indices: list[int]) -> list[Any]:
            nonlocal done
            results = client.score([pairs[i] for i in indices])
            with done_lock:
                done += 1
            return results

        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            futures = [pool.submit(one, idx) for idx in requests]
            while done < 6:  # under load: both replicas busy with requests in flight
                time.sleep(0.02)
            victim = replica_processes()[0]
            os.kill(victim.pid, signal.SIGKILL)
            answers = [f.result(timeout=120) for f in futures]

    assert done == len(requests)
    for indices, results in zip(requests, answers):
        assert len(results) == len(indices)
        for i, res in zip(indices, results):
            want = expected[i]
            assert math.isclose(res.rewards["m"], want["rewards"]["m"], abs_tol=1e-4)
            assert math.isclose(res.utility, want["utility"], abs_tol=1e-4)
            assert res.references["m"] == 0.25
    # Requests in flight on the killed replica come back 503 + replica_unavailable and are retried.
    # Whether the kill catches one in flight depends on Ray's routing at that instant (a fresh-clone
    # run once saw none), so their absence is reported, not failed; the answers above are checked
    # either way.
    if not any(s == 503 and "replica_unavailable" in text for s, text in transport.statuses):
        warnings.warn(f"the kill caught no request in flight this time: {transport.statuses}", stacklevel=1)
    assert {s for s, _ in transport.statuses} <= {429, 503}, transport.statuses

    # Ray replaces the dead replica: two healthy replicas again, one of them a new process.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = serve.status().applications[APP].deployments[APP]
        pids = {p.pid for p in replica_processes()}
        if status.replica_states == {"RUNNING": 2} and len(pids) == 2 and victim.pid not in pids:
            break
        time.sleep(0.25)
    else:
        raise AssertionError(f"replica not replaced: {status.replica_states}, processes {pids}")
    assert str(status.status).endswith("HEALTHY")
    assert len(pids - before) == 1
    with RewardClient(ray_url) as client:
        again = client.score(pairs[:8])
    assert all(math.isclose(r.rewards["m"], e["rewards"]["m"], abs_tol=1e-4) for r, e in zip(again, expected))


def test_backpressure_is_429_with_the_services_retry_after(ray_url: str, tiny_bert: Path) -> None:
    settings = Settings.model_validate({
        "models": [{"name": "m", "path": str(tiny_bert), "device": "cpu", "dtype": "float32"}],
        "engine": {"max_wait_ms": 1, "threads": 1, "retry_after_s": 2},
    })
    options = RayServeOptions(name="tight", min_replicas=1, max_replicas=1, num_cpus=0.5,
                              max_ongoing_requests=1, max_queued_requests=1)
    serve.run(build(options, settings), name="tight", route_prefix="/")
    try:
        body = {"items": [{"prompt": HH, "response": " ".join(WORDS[i % 100: i % 100 + 20])} for i in range(200)]}
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(lambda _: httpx.post(ray_url + "/v1/score", json=body, timeout=60), range(8)))
        codes = sorted(r.status_code for r in replies)
        assert set(codes) == {200, 429}, codes  # one replica, one ongoing, one queued: the rest wait
        for r in replies:
            if r.status_code == 429:
                assert r.headers["retry-after"] == "2"
        with RewardClient(ray_url, max_backoff_s=2) as client:  # the client waits and retries them
            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                results = list(pool.map(lambda _: client.score([(HH, "the dog")]), range(4)))
        assert all(len(r) == 1 and math.isfinite(r[0].utility) for r in results)
    finally:
        serve.delete("tight")


def test_builder_arguments_are_validated_before_anything_is_deployed(tmp_path: Path) -> None:
    """``serve run deploy.ray_serve:build_app key=value``: strings typed, bad values named."""
    from ray.serve import Application

    from deploy.ray_serve import build_app

    assert isinstance(build_app({"max_replicas": "3", "num_gpus": "0"}), Application)  # embedded defaults
    with pytest.raises(ValueError, match="max_replicas"):
        build_app({"min_replicas": "3", "max_replicas": "2"})
    with pytest.raises(ValueError, match="replica"):
        build_app({"replicas": "2"})  # a typo is an error, not ignored
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [{name: m, path: x, dtype: float64}]\n")
    with pytest.raises(ValueError, match="models.0.dtype"):
        build_app({"config": str(bad)})
