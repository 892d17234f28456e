"""The embedded default models: `logand serve` with no config serves them, and they rank
held-out HH pairs better than chance (scored over real HTTP by a real server)."""

from __future__ import annotations

import random
from pathlib import Path

import httpx
import pytest

from service.config import load_settings
from tests.conftest import HH_DIR, REPO, LiveServer, needs_data

DEFAULT_DIR = REPO / "service" / "default_models"
pytestmark = pytest.mark.skipif(not (DEFAULT_DIR / "helpful" / "adapter_config.json").is_file(),
                                reason="default models not trained (run `make models`)")


@pytest.fixture(scope="module")
def default_server(tmp_path_factory: pytest.TempPathFactory) -> LiveServer:
    # The embedded config exactly, on a free port: what `make serve` runs.
    settings = load_settings(None, env={})
    config = settings.model_dump(mode="json", exclude={"base_dir"})
    for m in config["models"]:
        m["path"] = str(Path(settings.base_dir or "") / m["path"])
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
        assert models["models"][name]["reference"].startswith("constant")
        assert models["models"][name]["style"] == "pair"


@needs_data
@pytest.mark.parametrize("prop, file", [("helpful", "helpful-base"), ("harmless", "harmless-base")])
def test_default_models_prefer_chosen_on_unseen_prompts(default_server: LiveServer, prop: str, file: str) -> None:
    from trainer.data import load_preferences, split_pairs

    pairs = split_pairs(load_preferences(HH_DIR / f"{file}.test.jsonl.gz")[0], 0.2, 0)["align_heldout"]
    sample = random.Random(0).sample(pairs, min(len(pairs), 200))
    items = [{"prompt": p.prompt, "response": r} for p in sample for r in (p.chosen, p.rejected)]
    r = httpx.post(default_server.url + "/v1/score", timeout=300,
                   json={"items": items, "models": [prop], "method": "raw", "allow_truncation": True})
    assert r.status_code == 200, r.text
    rewards = [res["rewards"][prop] for res in r.json()["results"]]
    accuracy = sum(c > rj for c, rj in zip(rewards[0::2], rewards[1::2])) / len(sample)
    assert accuracy > 0.55, accuracy
