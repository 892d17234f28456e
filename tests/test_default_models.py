"""The embedded default models: `logand serve` with no config serves them, and they rank
held-out HH pairs better than chance (scored over real HTTP by a real server)."""

from __future__ import annotations

import json

import httpx
import pytest

from service.config import load_settings
from tests.conftest import HH_DIR, REPO, LiveServer, needs_data

DEFAULT_DIR = REPO / "service" / "default_models"
REPORT = REPO / "reports" / "reward-models" / "results.json"
pytestmark = pytest.mark.skipif(not (DEFAULT_DIR / "helpful" / "adapter_config.json").is_file(),
                                reason="default models not trained (run `make models`)")


@pytest.fixture(scope="module")
def default_server(tmp_path_factory: pytest.TempPathFactory) -> LiveServer:
    # The embedded config exactly, on a free port: what `make serve` runs.
    settings = load_settings(None, env={})
    config = settings.model_dump(mode="json")  # base_dir kept: model and reference paths stay relative to it
    config["engine"]["threads"] = 2
    server = LiveServer(config, tmp_path_factory.mktemp("default"))
    try:
        server.wait_ready(timeout=300)
        yield server
    finally:
        server.stop()


def test_default_config_serves_helpful_and_harmless(default_server: LiveServer) -> None:
    models = httpx.get(default_server.url + "/v1/models").json()
    assert models["default_models"] == ["helpful", "harmless"]
    assert {"helpful-evaluator", "harmless-evaluator"} <= set(models["models"])
    for name in ("helpful", "harmless"):
        assert models["models"][name]["style"] == "pair"
    fitted = (DEFAULT_DIR / "references" / "helpful.quantile.json").is_file()
    assert models["models"]["helpful"]["reference"].startswith("quantile" if fitted else "constant")
    assert models["models"]["harmless"]["reference"].startswith("responses (4)")


def test_harmless_reference_is_the_mean_reward_of_canned_refusals(default_server: LiveServer) -> None:
    from trainer.default_models import REFUSALS

    prompt = "\n\nHuman: How do I pick a lock?\n\nAssistant:"
    raw = httpx.post(default_server.url + "/v1/score", json={
        "items": [{"prompt": prompt, "response": r} for r in REFUSALS], "models": ["harmless"], "method": "raw"})
    assert raw.status_code == 200, raw.text
    refusal_rewards = [res["rewards"]["harmless"] for res in raw.json()["results"]]
    r = httpx.post(default_server.url + "/v1/score", json={"items": [{"prompt": prompt, "response": "Sure."}]})
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["references"]["harmless"] == pytest.approx(sum(refusal_rewards) / len(REFUSALS),
                                                                             abs=1e-4)


@needs_data
@pytest.mark.parametrize("prop, file", [("helpful", "helpful-base"), ("harmless", "harmless-base")])
def test_served_defaults_reproduce_their_reported_accuracy(default_server: LiveServer, prop: str, file: str) -> None:
    """Over real HTTP, each default model ranks its held-out pairs (prompts it never saw) as the
    report says it does, and better than chance."""
    from trainer.data import load_preferences, split_pairs

    reported = json.loads(REPORT.read_text())[prop]["reward_model"]["served"]
    pairs = split_pairs(load_preferences(HH_DIR / f"{file}.test.jsonl.gz")[0], 0.2, 0)[reported["split"]]
    assert len(pairs) == reported["pairs"]
    items = [{"prompt": p.prompt, "response": r} for p in pairs for r in (p.chosen, p.rejected)]
    r = httpx.post(default_server.url + "/v1/score", timeout=600,
                   json={"items": items, "models": [prop], "method": "raw", "allow_truncation": True})
    assert r.status_code == 200, r.text
    rewards = [res["rewards"][prop] for res in r.json()["results"]]
    accuracy = sum(c > rj for c, rj in zip(rewards[0::2], rewards[1::2])) / len(pairs)
    assert accuracy == pytest.approx(reported["accuracy"], abs=0.01)
    assert accuracy > 0.55
