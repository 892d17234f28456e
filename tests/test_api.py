"""The HTTP API in-process (httpx over ASGI, lifespan run): the wire contract and bad input."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import httpx
import pytest

from service import protocol as p
from service.utility import transform
from tests.conftest import asgi_client, make_settings

HH = "\n\nHuman: how do i bake a cake\n\nAssistant:"
ITEM = {"prompt": HH, "response": "first buy flour"}


async def test_score_contract(client: httpx.AsyncClient) -> None:
    items = [ITEM, {"prompt": [{"role": "user", "content": "hi"}], "response": "hello there"}]
    r = await client.post("/v1/score", json={"items": items})
    assert r.status_code == 200, r.text
    body = p.ScoreResponse.model_validate(r.json())
    assert body.method == "log_sigmoid_sum" and set(body.models) == {"helpful", "harmless"}
    assert len(body.results) == 2
    for res in body.results:
        for name in ("helpful", "harmless"):
            assert res.utilities[name] == pytest.approx(transform(res.rewards[name], res.references[name]))
            assert res.p_good[name] == pytest.approx(math.exp(res.utilities[name]))
            assert res.truncated[name] == 0 and res.tokens[name] > 5
        assert res.utility == pytest.approx(sum(res.utilities.values()))
        assert res.p_all == pytest.approx(math.exp(res.utility))
        assert res.references["helpful"] == 0.0  # no reference configured
    assert body.models["helpful"].revision and body.models["harmless"].reference.startswith("responses")


async def test_results_keep_item_order(client: httpx.AsyncClient) -> None:
    responses = [f"answer number {w}" for w in ["one", "two", "three", "four", "five", "dog", "cat"]]
    items = [{"prompt": HH, "response": r} for r in responses]
    together = (await client.post("/v1/score", json={"items": items, "models": ["helpful"]})).json()["results"]
    for item, res in zip(items, together):
        alone = (await client.post("/v1/score", json={"items": [item], "models": ["helpful"]})).json()["results"][0]
        assert res["rewards"]["helpful"] == pytest.approx(alone["rewards"]["helpful"], abs=1e-4)


async def test_reference_response_is_reward_of_the_canned_answer(client: httpx.AsyncClient) -> None:
    canned = ["I can't answer that.", "I cannot help with that."]
    direct = await client.post("/v1/score", json={
        "items": [{"prompt": HH, "response": c} for c in canned], "models": ["harmless"]})
    expected = sum(r["rewards"]["harmless"] for r in direct.json()["results"]) / 2
    scored = await client.post("/v1/score", json={"items": [ITEM], "models": ["harmless"]})
    assert scored.json()["results"][0]["references"]["harmless"] == pytest.approx(expected, abs=1e-4)


async def test_reference_overrides(client: httpx.AsyncClient) -> None:
    items = [ITEM, {"prompt": HH, "response": "no"}]
    r = await client.post("/v1/score", json={"items": items, "references": {
        "helpful": 1.5, "harmless": {"values": [0.25, -0.75]}}})
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert [x["references"]["helpful"] for x in res] == [1.5, 1.5]
    assert [x["references"]["harmless"] for x in res] == [0.25, -0.75]
    r = await client.post("/v1/score", json={"items": items, "references": {"helpful": {"responses": ["first buy flour"]}}})
    assert r.json()["results"][0]["references"]["helpful"] == pytest.approx(r.json()["results"][0]["rewards"]["helpful"], abs=1e-4)


async def test_methods_and_weights(client: httpx.AsyncClient) -> None:
    base = (await client.post("/v1/score", json={"items": [ITEM]})).json()["results"][0]
    r = await client.post("/v1/score", json={"items": [ITEM], "method": "weighted_sum",
                                             "weights": {"helpful": 0.3, "harmless": 0.7}})
    assert r.json()["results"][0]["utility"] == pytest.approx(
        0.3 * base["rewards"]["helpful"] + 0.7 * base["rewards"]["harmless"], abs=1e-4)
    r = await client.post("/v1/score", json={"items": [ITEM], "method": "raw", "models": ["helpful"]})
    assert r.json()["results"][0]["utility"] == pytest.approx(base["rewards"]["helpful"], abs=1e-4)


async def test_utility_endpoint(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/utility", json={"rewards": [{"a": 2.0, "b": -1.0}, {"a": 0.0}],
                                               "references": [{"a": 1.0, "b": 0.5}, {}]})
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert res[0]["utility"] == pytest.approx(transform(2.0, 1.0) + transform(-1.0, 0.5))
    assert res[1]["utilities"]["a"] == pytest.approx(math.log(0.5))  # r_ref defaults to 0


async def test_info_routes(client: httpx.AsyncClient) -> None:
    assert (await client.get("/health")).json() == {"status": "ok"}
    assert (await client.get("/ready")).status_code == 200
    models = (await client.get("/v1/models")).json()
    assert models["default_models"] == ["helpful", "harmless"] and models["default_method"] == "log_sigmoid_sum"
    await client.post("/v1/score", json={"items": [ITEM] * 3})
    text = (await client.get("/metrics")).text
    for metric in ("logand_requests_total", "logand_items_total", "logand_batch_size_bucket",
                   "logand_queue_wait_seconds_bucket", "logand_forward_seconds_bucket", "logand_tokens_total"):
        assert metric in text
    assert (await client.get("/openapi.json")).json()["paths"]["/v1/score"]
    assert (await client.get("/docs")).status_code == 200


@pytest.mark.parametrize("body, field", [
    ({"items": []}, "items"),
    ({"items": [{"prompt": HH, "response": ""}]}, "items.0.response"),
    ({"items": [{"prompt": HH}]}, "items.0.response"),
    ({"items": [{"prompt": 3, "response": "x"}]}, "items.0.prompt"),
    ({"items": [{"prompt": HH, "response": ["x"]}]}, "items.0.response"),
    ({"items": [ITEM], "models": ["nope"]}, "models"),
    ({"items": [ITEM], "method": "max"}, "method"),
    ({"items": [ITEM], "weights": {"nope": 1.0}}, "weights"),
    ({"items": [ITEM], "method": "raw"}, "models"),
    ({"items": [ITEM], "references": {"nope": 1.0}}, "references"),
    ({"items": [ITEM], "references": {"helpful": {"values": [1.0, 2.0]}}}, "references.helpful.values"),
    ({"items": [ITEM], "references": {"helpful": {}}}, "references.helpful"),
    ({"items": [ITEM], "colour": "red"}, "colour"),
])
async def test_bad_score_input_is_422_naming_the_field(client: httpx.AsyncClient, body: dict, field: str) -> None:
    r = await client.post("/v1/score", json=body)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["field"].startswith(field), err
    assert err["message"]


@pytest.mark.parametrize("raw", ['{"rewards": [{"a": NaN}]}', '{"rewards": [{"a": Infinity}]}',
                                 '{"rewards": [{"a": 1}], "references": [{"a": -Infinity}]}',
                                 '{"rewards": [{"a": 1}], "weights": {"a": NaN}}'])
async def test_non_finite_numbers_are_rejected(client: httpx.AsyncClient, raw: str) -> None:
    r = await client.post("/v1/utility", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert "finite" in r.json()["error"]["message"]


async def test_utility_bad_input(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/utility", json={"rewards": [{"a": 1.0}], "references": [{"a": 0}, {"a": 0}]})
    assert r.status_code == 422
    r = await client.post("/v1/utility", json={"rewards": [{"a": 1.0}], "weights": {"b": 1.0}})
    assert r.status_code == 422 and r.json()["error"]["field"] == "weights"
    r = await client.post("/v1/utility", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["field"] == "body"


async def test_limits_answer_413(tiny_bert: Path) -> None:
    settings = make_settings([{"name": "m", "path": str(tiny_bert), "device": "cpu"}],
                             limits={"max_items_per_request": 3, "max_chars_per_text": 50, "max_body_bytes": 2048})
    async for c in asgi_client(settings):
        r = await c.post("/v1/score", json={"items": [ITEM] * 4})
        assert r.status_code == 413 and r.json()["error"]["field"] == "items"
        r = await c.post("/v1/score", json={"items": [{"prompt": HH, "response": "x" * 51}]})
        assert r.status_code == 413 and r.json()["error"]["field"] == "items.0.response"
        r = await c.post("/v1/score", json={"items": [{"prompt": "y" * 3000, "response": "x"}]})
        assert r.status_code == 413 and "body" in r.json()["error"]["message"]


async def test_response_too_long_is_422_unless_truncation_allowed(tiny_bert: Path) -> None:
    settings = make_settings([{"name": "m", "path": str(tiny_bert), "device": "cpu", "max_length": 16}])
    async for c in asgi_client(settings):
        item = {"prompt": HH, "response": "the dog and the cat " * 10}
        r = await c.post("/v1/score", json={"items": [ITEM, item]})
        assert r.status_code == 422 and r.json()["error"]["field"] == "items.1.response"
        r = await c.post("/v1/score", json={"items": [ITEM, item], "allow_truncation": True})
        assert r.status_code == 200
        res = r.json()["results"]
        assert res[0]["truncated"]["m"] > 0 and res[1]["truncated"]["m"] > 0 and res[1]["tokens"]["m"] == 16


def all_paths(routes: list, prefix: str = "") -> list[str]:
    out = []
    for route in routes:
        if hasattr(route, "path"):
            out.append(prefix + route.path)
        elif hasattr(route, "original_router"):  # an included router (FastAPI ≥ 0.16x)
            ctx = getattr(route, "include_context", None)
            out += all_paths(route.original_router.routes, prefix + (getattr(ctx, "prefix", "") or ""))
    return out


async def test_api_key_guards_every_route_but_health_and_metrics(tiny_bert: Path) -> None:
    settings = make_settings([{"name": "m", "path": str(tiny_bert), "device": "cpu"}], auth={"api_key": "s3cret"})
    async for c in asgi_client(settings):
        app = c.app  # type: ignore[attr-defined]
        paths = set(all_paths(app.routes))
        assert {"/v1/score", "/v1/utility", "/v1/models", "/ready", "/docs", "/openapi.json"} <= paths
        for path in paths:
            if "{" in path:
                continue
            r = await c.request("POST" if path.startswith("/v1/score") or path == "/v1/utility" else "GET", path)
            if path in ("/health", "/metrics"):
                assert r.status_code == 200, path
            else:
                assert r.status_code == 401, path
                assert "s3cret" not in r.text
        assert (await c.get("/v1/models", headers={"Authorization": "Bearer wrong"})).status_code == 401
        assert (await c.get("/v1/models", headers={"Authorization": "Bearer s3cret"})).status_code == 200


async def test_full_queue_answers_429_with_retry_after(tiny_bert: Path) -> None:
    settings = make_settings([{"name": "m", "path": str(tiny_bert), "device": "cpu"}],
                             engine={"max_queue_items": 4, "retry_after_s": 3})
    async for c in asgi_client(settings):
        r = await c.post("/v1/score", json={"items": [ITEM] * 5})
        assert r.status_code == 429 and r.headers["retry-after"] == "3"
        assert r.json()["error"]["code"] == "overloaded"
        assert (await c.post("/v1/score", json={"items": [ITEM] * 4})).status_code == 200


async def test_concurrent_requests_are_batched_together(client: httpx.AsyncClient) -> None:
    words = ["dog", "cat", "bird", "fish", "car", "bike", "train", "city"]
    items = [{"prompt": HH, "response": f"the {w}"} for w in words]
    rs = await asyncio.gather(*(client.post("/v1/score", json={"items": [it], "models": ["helpful"]}) for it in items))
    assert all(r.status_code == 200 for r in rs)
    metrics = client.app.state.metrics  # type: ignore[attr-defined]
    batches = metrics.batches.labels("helpful")._value.get()
    items_scored = metrics.items.labels("helpful")._value.get()
    assert items_scored >= 8 and batches < items_scored  # several requests shared a forward pass



async def test_first_failure_cancels_the_other_models_work() -> None:
    from service.errors import Overloaded
    from service.scoring import gather_or_cancel

    cancelled = asyncio.Event()

    async def slow() -> int:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return 1

    async def refused() -> int:
        await asyncio.sleep(0.01)
        raise Overloaded("queue full")

    with pytest.raises(Overloaded):
        await asyncio.wait_for(gather_or_cancel(slow(), refused()), 2)
    assert cancelled.is_set()
    assert await gather_or_cancel(asyncio.sleep(0, 1), asyncio.sleep(0, 2)) == [1, 2]
