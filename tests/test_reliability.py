"""Reliability under load, shutdown, faults and bad input, on a real server over real HTTP."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import LiveServer


def _items(n: int, words: int = 60) -> list[dict[str, str]]:
    return [{"prompt": f"\n\nHuman: question {i} " + "word " * words + "\n\nAssistant:",
             "response": f"answer {i} " + "text " * words} for i in range(n)]


async def _hammer(url: str, n: int, items: int, concurrency: int, headers: dict[str, str] | None = None,
                  timeout: float = 120) -> list[httpx.Response | Exception]:
    """n requests of ``items`` items each, ``concurrency`` at a time; every outcome kept."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        async def one(i: int) -> httpx.Response | Exception:
            async with sem:
                try:
                    return await client.post("/v1/score", json={"items": _items(items)[:items], "models": ["m"]},
                                             headers=headers)
                except Exception as exc:  # connection errors are outcomes to count, not to hide
                    return exc
        return list(await asyncio.gather(*(one(i) for i in range(n))))


def test_sigterm_under_load_drains_accepted_work_and_refuses_new(tiny_bert: Path, tmp_path: Path) -> None:
    """SIGTERM while requests are queued: /ready turns 503 first, new requests get 503 with
    Retry-After, every request accepted before the signal completes with 200, exit code 0."""
    server = LiveServer({"models": [{"name": "m", "path": str(tiny_bert), "device": "cpu", "dtype": "float32"}],
                         "engine": {"threads": 1, "max_batch_size": 4, "max_wait_ms": 0}}, tmp_path)
    server.wait_ready()

    async def scenario() -> tuple[list[Any], list[int], int, int]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            accepted = [asyncio.ensure_future(client.post("/v1/score", json={"items": _items(16, 100), "models": ["m"]}))
                        for _ in range(24)]
            while len([1 for line in server.log().splitlines() if "POST /v1/score" in line]) == 0 and \
                    not all(f.done() for f in accepted):
                await asyncio.sleep(0.01)  # work is flowing: at least one request has been answered
            await asyncio.sleep(0.05)
            pending = sum(not f.done() for f in accepted)
            server.proc.send_signal(signal.SIGTERM)
            ready: list[int] = []
            for _ in range(200):  # readiness turns false quickly, while accepted work still runs
                try:
                    ready.append((await client.get("/ready", timeout=2)).status_code)
                except httpx.TransportError:
                    break
                if ready[-1] == 503:
                    break
                await asyncio.sleep(0.01)
            late = await client.post("/v1/score", json={"items": _items(1), "models": ["m"]})
            results = await asyncio.gather(*accepted, return_exceptions=True)
            late_code = late.status_code if late.status_code != 503 or "Retry-After" in late.headers else -1
            return results, ready, late_code, pending

    try:
        results, ready, late, pending = asyncio.run(scenario())
        code = server.proc.wait(60)
    finally:
        server.stop()
    assert pending > 4, f"only {pending} requests were still in flight at SIGTERM: the test proves nothing"
    assert ready and ready[-1] == 503, f"readiness did not turn false: {ready}"
    assert late == 503, "a request after SIGTERM was not refused with 503 + Retry-After"
    statuses = [r.status_code if isinstance(r, httpx.Response) else type(r).__name__ for r in results]
    assert statuses == [200] * len(results), f"accepted requests lost: {statuses}"
    assert all(len(r.json()["results"]) == 16 for r in results)
    assert code == 0, f"exit code {code} after a clean drain"
    assert "draining" in server.log() and "drained in" in server.log()


async def _open_loop(url: str, rate: float, seconds: float, items: int) -> list[httpx.Response | Exception]:
    """Requests sent at a fixed rate whatever the answers (an open loop, like many trainers)."""
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    body = {"items": _items(items), "models": ["m"]}
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        async def one() -> httpx.Response | Exception:
            try:
                return await client.post("/v1/score", json=body)
            except Exception as exc:
                return exc
        tasks, start = [], time.monotonic()
        for i in range(int(rate * seconds)):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one()))
        return list(await asyncio.gather(*tasks))


def _throughput(url: str, items: int = 32, n: int = 16) -> float:
    started = time.monotonic()
    out = asyncio.run(_hammer(url, n, items, concurrency=4))
    assert all(isinstance(r, httpx.Response) and r.status_code == 200 for r in out)
    return n * items / (time.monotonic() - started)


def test_overload_is_answered_with_429_and_throughput_recovers(tiny_bert: Path, tmp_path: Path) -> None:
    """About 10× the measured capacity for a few seconds: every request gets 200 or 429/503
    with Retry-After, none a connection error or another 5xx; the server's memory stays bounded;
    afterwards throughput is back to normal."""
    import psutil

    server = LiveServer({"models": [{"name": "m", "path": str(tiny_bert), "device": "cpu", "dtype": "float32"}],
                         "engine": {"threads": 1, "max_queue_items": 128}}, tmp_path)
    server.wait_ready()
    try:
        proc = psutil.Process(server.proc.pid)
        before = _throughput(server.url)
        rss_before = proc.memory_info().rss
        items = 32  # the same texts as the capacity was measured on
        outcomes = asyncio.run(_open_loop(server.url, rate=10 * before / items, seconds=3, items=items))
        rss_after = proc.memory_info().rss
        after = _throughput(server.url)
    finally:
        server.stop()
    errors = [type(r).__name__ for r in outcomes if isinstance(r, Exception)]
    assert not errors, f"{len(errors)} requests failed without an answer: {errors[:5]}"
    statuses = [r.status_code for r in outcomes if isinstance(r, httpx.Response)]
    assert set(statuses) <= {200, 429, 503}, f"unexpected statuses {sorted(set(statuses))}"
    refused = [r for r in outcomes if isinstance(r, httpx.Response) and r.status_code != 200]
    assert refused, "the load never exceeded capacity: the test proves nothing"
    assert all(r.headers.get("Retry-After") for r in refused)
    assert statuses.count(200) > 0
    assert rss_after - rss_before < 200 * 2**20, f"memory grew by {(rss_after - rss_before) / 2**20:.0f} MiB"
    assert after > 0.6 * before, f"throughput did not recover: {before:.0f} → {after:.0f} items/s"
    print(f"capacity {before:.0f} items/s; offered {10 * before:.0f} items/s for 3 s: {statuses.count(200)} × 200, "
          f"{len(refused)} refused; RSS {rss_before / 2**20:.0f} → {rss_after / 2**20:.0f} MiB; after {after:.0f} items/s")


@pytest.fixture(scope="module")
def strict_server(tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path) -> Any:
    server = LiveServer({"models": [{"name": "m", "path": str(tiny_bert), "device": "cpu", "dtype": "float32"}],
                         "engine": {"threads": 1},
                         "limits": {"max_items_per_request": 8, "max_chars_per_text": 1000, "max_body_bytes": 100_000}},
                        tmp_path_factory.mktemp("strict"))
    try:
        yield server.wait_ready()
    finally:
        server.stop()


OK_ITEM = {"prompt": "\n\nHuman: hi\n\nAssistant:", "response": "hello"}
BAD_INPUT = [
    ("empty items", json.dumps({"items": []}), 422, "items"),
    ("empty response", json.dumps({"items": [{**OK_ITEM, "response": ""}]}), 422, "items.0.response"),
    ("wrong type", json.dumps({"items": [{**OK_ITEM, "response": 5}]}), 422, "items.0.response"),
    ("items not a list", json.dumps({"items": "x"}), 422, "items"),
    ("unknown field", json.dumps({"items": [OK_ITEM], "temperature": 1}), 422, "temperature"),
    ("unknown nested field", json.dumps({"items": [{**OK_ITEM, "score": 1}]}), 422, "items.0.score"),
    ("unknown model", json.dumps({"items": [OK_ITEM], "models": ["nope"]}), 422, "models"),
    ("too many items", json.dumps({"items": [OK_ITEM] * 9}), 413, "items"),
    ("text over the limit", json.dumps({"items": [{**OK_ITEM, "response": "a" * 1001}]}), 413, "items.0.response"),
    ("huge body", json.dumps({"items": [{**OK_ITEM, "response": "a" * 200_000}]}), 413, None),
    ("lone surrogate", '{"items": [{"prompt": "\\udc80", "response": "x"}]}', 422, "items.0.prompt"),
    ("invalid UTF-8", b'{"items": [{"prompt": "\xff\xfe", "response": "x"}]}', 400, "body"),
    ("not JSON", "{items: [", 400, "body"),
    ("deeply nested", '{"items": ' + "[" * 100_000 + "]" * 100_000 + "}", 413, None),
    ("nested within the limit", '{"items": ' + "[" * 20_000 + "]" * 20_000 + "}", 400, "body"),
    ("NaN reference", '{"items": [' + json.dumps(OK_ITEM) + '], "references": {"m": NaN}}', 422, "references.m"),
]


@pytest.mark.parametrize(("body", "status", "field"), [b[1:] for b in BAD_INPUT], ids=[b[0] for b in BAD_INPUT])
def test_bad_input_gets_a_4xx_naming_the_field(strict_server: LiveServer, body: str | bytes, status: int,
                                               field: str | None) -> None:
    r = httpx.post(strict_server.url + "/v1/score", content=body, headers={"Content-Type": "application/json"},
                   timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] and error["message"]
    if field is not None:
        assert error.get("field") == field, error
    assert httpx.get(strict_server.url + "/ready").status_code == 200  # and the server is fine


def test_request_ids_are_logged_and_bodies_never(strict_server: LiveServer) -> None:
    secret = "my-private-prompt-text-91823"
    r = httpx.post(strict_server.url + "/v1/score", headers={"X-Request-ID": "trace-42"},
                   json={"items": [{"prompt": secret, "response": secret}]})
    assert r.status_code == 200 and r.headers["X-Request-ID"] == "trace-42"
    bad = httpx.post(strict_server.url + "/v1/score", json={"items": [{"prompt": secret, "response": 7}]})
    assert bad.status_code == 422 and len(bad.headers["X-Request-ID"]) == 32  # one is made when none is sent
    deadline = time.monotonic() + 5  # the access line is written just after the response is sent
    while bad.headers["X-Request-ID"] not in strict_server.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    log = strict_server.log()
    assert "trace-42 POST /v1/score 200" in log and bad.headers["X-Request-ID"] in log
    assert secret not in log


def test_cors_is_off_unless_configured(strict_server: LiveServer) -> None:
    r = httpx.options(strict_server.url + "/v1/score", headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in r.headers


def test_the_server_binds_loopback_and_trusts_no_remote_code_by_default() -> None:
    from service.config import Settings

    s = Settings.model_validate({"models": [{"name": "m", "path": "x"}]})
    assert s.server.host == "127.0.0.1" and not s.models[0].trust_remote_code and not s.server.cors_origins


def test_pickled_weights_are_refused(tiny_bert: Path, tmp_path: Path) -> None:
    """Only safetensors are loaded: a checkpoint in pickle format (which can run code when
    read) makes start-up fail with the model's name, not load."""
    import shutil

    import torch
    from safetensors.torch import load_file

    from service.backends import load_backend
    from service.backends.modeling import ModelLoadError
    from service.config import ModelConfig

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_bert, pickled)
    weights = pickled / "model.safetensors"
    torch.save(load_file(weights), pickled / "pytorch_model.bin")
    weights.unlink()
    with pytest.raises(ModelLoadError, match="'p'"):
        load_backend(ModelConfig(name="p", path=str(pickled), device="cpu"), None)


class _Faulty:
    """A real backend that misbehaves on items whose text holds a trigger word (one the tiny
    tokenizer knows): raises ("weapon"), returns NaN ("drug"), or hangs ("snow").  The stimulus of the fault tests; the engine and HTTP layers under
    test are the real ones."""

    def __init__(self, real: Any, tokenizer: Any) -> None:
        self._real, self._tok = real, tokenizer
        self.info, self.on_gpu = real.info, real.on_gpu

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def score(self, batch: Any) -> list[float]:
        texts = [self._tok.decode(e.input_ids) for e in batch]
        if any("weapon" in t for t in texts):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        if any("snow" in t for t in texts):
            time.sleep(3)
        scores = self._real.score(batch)
        return [float("nan") if "drug" in t else s for t, s in zip(texts, scores)]


async def _faulty_app(tiny_bert: Path, monkeypatch: pytest.MonkeyPatch, batch_timeout_s: float) -> Any:
    from transformers import AutoTokenizer

    from service import scoring
    from tests.conftest import asgi_client, make_settings

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    real_load = scoring.load_backend
    monkeypatch.setattr(scoring, "load_backend", lambda *a, **k: _Faulty(real_load(*a, **k), tokenizer))
    settings = make_settings([{"name": "m", "path": str(tiny_bert), "dtype": "float32", "device": "cpu"}],
                             engine={"batch_timeout_s": batch_timeout_s, "max_wait_ms": 50, "max_queue_items": 4})
    async for c in asgi_client(settings):
        yield c


@pytest.fixture
async def faulty_client(tiny_bert: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    async for c in _faulty_app(tiny_bert, monkeypatch, batch_timeout_s=1.0):
        yield c


@pytest.fixture
async def slow_faulty_client(tiny_bert: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A 2.5 s batch timeout: the hung batch (3 s) holds the queue full long enough to look."""
    async for c in _faulty_app(tiny_bert, monkeypatch, batch_timeout_s=2.5):
        yield c


def _req(*responses: str) -> dict[str, Any]:
    return {"items": [{"prompt": "\n\nHuman: hi\n\nAssistant:", "response": r} for r in responses]}


async def test_faults_fail_only_their_items_and_the_service_stays_ready(faulty_client: httpx.AsyncClient) -> None:
    c = faulty_client
    # A backend exception fails its batch with a clear 500 naming the model; the next batch scores.
    r = await c.post("/v1/score", json=_req("a weapon"))
    assert r.status_code == 500 and "'m'" in r.json()["error"]["message"] and "illegal memory" in r.text
    assert (await c.post("/v1/score", json=_req("good"))).status_code == 200
    # A NaN fails only its item's request: another request batched with it is answered.
    poisoned, clean = await asyncio.gather(c.post("/v1/score", json=_req("a drug")),
                                           c.post("/v1/score", json=_req("a good answer")))
    assert poisoned.status_code == 500 and "non-finite" in poisoned.json()["error"]["message"]
    assert clean.status_code == 200
    # A hung forward pass: 504 for its batch at the timeout; the next batch is scored.
    started = time.monotonic()
    hung = await c.post("/v1/score", json=_req("snow day"))
    assert hung.status_code == 504 and time.monotonic() - started < 2.9
    assert (await c.post("/v1/score", json=_req("sun day"))).status_code == 200
    assert (await c.get("/ready")).status_code == 200


async def test_readiness_is_false_while_a_queue_is_full(slow_faulty_client: httpx.AsyncClient) -> None:
    c = slow_faulty_client
    busy = asyncio.ensure_future(c.post("/v1/score", json=_req(*["snow"] * 4)))  # fills the queue of 4
    # Polled, not slept: the queue is full from the request's admission until its batch times out
    # (a fixed 0.4 s wait once looked before the admission in a fresh-clone run).
    r, deadline = None, time.monotonic() + 2.0
    while not busy.done() and time.monotonic() < deadline:
        r = await c.get("/ready")
        if r.status_code == 503:
            break
        await asyncio.sleep(0.05)
    assert r is not None and r.status_code == 503, f"/ready never said overloaded while the queue was full: {r}"
    assert r.json()["error"]["code"] == "overloaded" and r.headers["Retry-After"]
    assert (await busy).status_code == 504
    assert (await c.get("/ready")).status_code == 200
