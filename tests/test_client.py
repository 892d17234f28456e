"""The HTTP clients against a live tiny service (real uvicorn, real HTTP)."""

from __future__ import annotations

import http.server
import threading
from typing import Iterator

import httpx
import pytest

from clients.client import AsyncRewardClient, RequestRejected, RewardClient, ServiceUnavailable
from tests.conftest import LiveServer, free_port

HH = "\n\nHuman: what should i cook tonight\n\nAssistant:"
PAIRS = [(HH, f"the {w}") for w in ["dog", "cat", "bird", "fish", "car", "bike", "train", "city", "music", "book"]]


def test_chunked_scores_come_back_in_order(live_server: LiveServer) -> None:
    with RewardClient(live_server.url) as whole, RewardClient(live_server.url, chunk_size=3) as chunked:
        one = whole.score(PAIRS, models=["enc"])
        refs = {"enc": {"values": [float(i) for i in range(len(PAIRS))]}}
        parts = chunked.score(PAIRS, models=["enc"], references=refs)
    assert [r.rewards["enc"] for r in parts] == pytest.approx([r.rewards["enc"] for r in one], abs=1e-4)
    assert [r.references["enc"] for r in parts] == [float(i) for i in range(len(PAIRS))]


async def test_async_client_matches_sync(live_server: LiveServer) -> None:
    async with AsyncRewardClient(live_server.url, chunk_size=4) as client:
        results = await client.score(PAIRS, method="raw", models=["dec"])
    with RewardClient(live_server.url) as rc:
        expected = rc.score(PAIRS, method="raw", models=["dec"])
    assert [r.utility for r in results] == pytest.approx([r.utility for r in expected], abs=1e-4)


async def test_async_client_has_the_sync_clients_calls(live_server: LiveServer) -> None:
    rewards = [{"enc": 0.5, "dec": -1.0}, {"enc": 2.0, "dec": 0.25}]
    refs = [{"enc": 0.0, "dec": 0.0}, {"enc": 1.0, "dec": 1.0}]
    async with AsyncRewardClient(live_server.url) as client:
        assert await client.ready()
        models = await client.models()
        got = await client.utility(rewards, refs, method="log_sigmoid_sum")
    with RewardClient(live_server.url) as rc:
        assert models == rc.models()
        expected = rc.utility(rewards, refs, method="log_sigmoid_sum")
    assert got == expected and len(got.results) == 2
    async with AsyncRewardClient("http://127.0.0.1:9", max_retries=0) as dead:
        assert not await dead.ready()


def test_bad_input_is_not_retried(live_server: LiveServer) -> None:
    with RewardClient(live_server.url, backoff_s=5) as rc, pytest.raises(RequestRejected) as exc:
        rc.score(PAIRS[:1], models=["nope"])
    assert exc.value.status == 422 and exc.value.field == "models"


class FlakyProxy:
    """A real HTTP server that answers 429 twice, then forwards to the real service."""

    def __init__(self, upstream: str, refusals: int = 2) -> None:
        self.calls = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.calls += 1
                if outer.calls <= refusals:
                    payload, status, headers = b'{"error": {"code": "overloaded", "message": "busy"}}', 429, {"Retry-After": "0"}
                else:
                    r = httpx.post(upstream + self.path, content=body, headers={"content-type": "application/json"})
                    payload, status, headers = r.content, r.status_code, {}
                self.send_response(status)
                for k, v in {"Content-Type": "application/json", "Content-Length": str(len(payload)), **headers}.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def flaky(live_server: LiveServer) -> Iterator[FlakyProxy]:
    proxy = FlakyProxy(live_server.url)
    yield proxy
    proxy.close()


def test_retries_429_then_succeeds(flaky: FlakyProxy) -> None:
    with RewardClient(flaky.url, backoff_s=0.01) as rc:
        results = rc.score(PAIRS[:2], models=["enc"])
    assert flaky.calls == 3 and len(results) == 2


def test_gives_up_after_retries(flaky: FlakyProxy) -> None:
    with RewardClient(flaky.url, max_retries=1, backoff_s=0.01) as rc, pytest.raises(ServiceUnavailable, match="2 tries"):
        rc.score(PAIRS[:1], models=["enc"])
    assert flaky.calls == 2


def test_connection_errors_are_retried_then_reported() -> None:
    with RewardClient(f"http://127.0.0.1:{free_port()}", max_retries=2, backoff_s=0.01) as rc:
        with pytest.raises(ServiceUnavailable) as exc:
            rc.models()
    assert isinstance(exc.value.__cause__, httpx.TransportError)


def test_api_key_is_sent(tiny_bert, tmp_path) -> None:  # type: ignore[no-untyped-def]
    server = LiveServer({"models": [{"name": "m", "path": str(tiny_bert), "device": "cpu"}],
                         "engine": {"threads": 1}}, tmp_path, env={"LOGAND_API_KEY": "k-9"})
    try:
        server.wait_ready(headers={"Authorization": "Bearer k-9"})
        with RewardClient(server.url, api_key="k-9") as rc:
            assert len(rc.score(PAIRS[:2])) == 2
        with RewardClient(server.url, api_key="wrong") as rc, pytest.raises(RequestRejected) as exc:
            rc.models()
        assert exc.value.status == 401
    finally:
        server.stop()


def test_service_local_starts_a_service_for_the_block_and_stops_it(tiny_bert, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import yaml

    from clients.local import service_url

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"models": [{"name": "enc", "path": str(tiny_bert), "device": "cpu"}],
                                      "engine": {"threads": 1}}))
    with service_url("local", config) as url:
        with RewardClient(url) as rc:
            assert rc.models()["default_models"] == ["enc"]
            assert len(rc.score([("\n\nHuman: hi\n\nAssistant:", "hello")])) == 1
    with pytest.raises(httpx.TransportError):
        httpx.get(url + "/health", timeout=2)
    with service_url("http://example.invalid:1") as same:
        assert same == "http://example.invalid:1"
