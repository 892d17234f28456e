"""A real server: ``python -m service serve`` under uvicorn on 127.0.0.1, spoken to over HTTP."""

from __future__ import annotations

import concurrent.futures
import math
import signal
from pathlib import Path

import httpx

from tests.conftest import LiveServer

HH = "\n\nHuman: what should i cook tonight\n\nAssistant:"


def test_scores_over_real_http(live_server: LiveServer) -> None:
    items = [{"prompt": HH, "response": r} for r in ["fish with rice", "i do not know", "a cake"]]
    r = httpx.post(live_server.url + "/v1/score", json={"items": items}, timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["models"]["dec"]["style"] == "chat" and body["models"]["enc"]["style"] == "pair"
    for res in body["results"]:
        assert res["references"]["enc"] == 0.5
        assert math.isclose(res["utility"], res["utilities"]["enc"] + res["utilities"]["dec"], rel_tol=1e-9)
        assert 0 < res["p_all"] < 1


def test_many_concurrent_clients_all_answered_in_order(live_server: LiveServer) -> None:
    words = ["dog", "cat", "bird", "fish", "car", "bike", "train", "city", "music", "song", "book", "movie"]

    def one(word: str) -> tuple[str, float]:
        r = httpx.post(live_server.url + "/v1/score", timeout=60, json={
            "items": [{"prompt": HH, "response": f"the {word}"}], "models": ["enc"], "method": "raw"})
        r.raise_for_status()
        return word, r.json()["results"][0]["utility"]

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        answers = dict(pool.map(one, words * 3))
    together = httpx.post(live_server.url + "/v1/score", timeout=60, json={
        "items": [{"prompt": HH, "response": f"the {w}"} for w in words], "models": ["enc"], "method": "raw"})
    for w, res in zip(words, together.json()["results"]):
        assert math.isclose(answers[w], res["utility"], abs_tol=1e-4)
    metrics = httpx.get(live_server.url + "/metrics").text
    assert 'logand_items_total{model="enc"}' in metrics


def test_unknown_route_and_method(live_server: LiveServer) -> None:
    assert httpx.get(live_server.url + "/v2/nothing").status_code == 404
    assert httpx.get(live_server.url + "/v1/score").status_code == 405


def test_api_key_from_env_and_graceful_sigterm(tiny_bert: Path, tmp_path: Path) -> None:
    server = LiveServer({"models": [{"name": "m", "path": str(tiny_bert), "device": "cpu"}],
                         "engine": {"threads": 1}}, tmp_path, env={"LOGAND_API_KEY": "k-123"})
    try:
        auth = {"Authorization": "Bearer k-123"}
        server.wait_ready(headers=auth)
        assert httpx.get(server.url + "/v1/models").status_code == 401
        assert httpx.get(server.url + "/health").status_code == 200
        assert httpx.get(server.url + "/v1/models", headers=auth).status_code == 200
        server.proc.send_signal(signal.SIGTERM)
        # uvicorn finishes its shutdown, then re-raises the signal it caught
        assert server.proc.wait(30) in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in server.log()
        assert "k-123" not in server.log()
    finally:
        server.stop()


def test_bad_config_fails_at_start_naming_the_field(tmp_path: Path) -> None:
    server = LiveServer({"models": [{"name": "m", "path": str(tmp_path), "dtype": "float64"}]}, tmp_path)
    assert server.proc.wait(60) == 2
    assert "models.0.dtype" in server.log()
    server.stop()


def test_unloadable_model_fails_at_start_naming_it(tmp_path: Path) -> None:
    server = LiveServer({"models": [{"name": "broken", "path": str(tmp_path / "missing")}]}, tmp_path)
    assert server.proc.wait(60) != 0
    assert "broken" in server.log() and "does not exist" in server.log()
    server.stop()
