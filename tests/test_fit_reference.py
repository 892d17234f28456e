"""fit-reference end to end: tiny policy → live tiny service → artifact the service serves."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from service.references import QuantilePredictor
from tests.conftest import LiveServer, asgi_client, make_settings
from tests.tiny import make_tiny_gpt2
from tests.trainer.test_train_rm import write_separable
from trainer import fit_reference as fr


def test_predictors_recover_prompt_dependent_mean_and_spread() -> None:
    rng = np.random.default_rng(0)
    prompts, means, stds = [], [], []
    for i in range(200):
        hard = i % 2 == 0
        prompts.append(f"{'riddle puzzle' if hard else 'greeting hello'} number {rng.integers(1000)}")
        means.append((-1.0 if hard else 2.0) + rng.normal(0, 0.05))
        stds.append((1.5 if hard else 0.3) + abs(rng.normal(0, 0.02)))
    predictor = QuantilePredictor(fr.fit_predictor(prompts, means, stds, l2=0.1), "test")
    mu_hard, sd_hard = predictor.predict("riddle puzzle number 5")
    mu_easy, sd_easy = predictor.predict("greeting hello number 5")
    assert mu_hard == pytest.approx(-1.0, abs=0.3) and mu_easy == pytest.approx(2.0, abs=0.3)
    assert sd_hard == pytest.approx(1.5, abs=0.3) and sd_easy == pytest.approx(0.3, abs=0.2)


async def test_fit_reference_end_to_end(live_server: LiveServer, tiny_bert: Path, tmp_path: Path) -> None:
    policy = make_tiny_gpt2(tmp_path / "policy", seed=11, lm=True)
    data = write_separable(tmp_path / "pairs.jsonl", n=60)
    ns = argparse.Namespace(
        policy=str(policy), data=[str(data)], service=live_server.url, api_key=None, models=["enc", "dec"],
        split="align_train", heldout_fraction=0.2, prompts=4, prompts_per_round=2, k=4, temperature=1.0,
        top_p=1.0, max_new_tokens=8, batch_size=8, seed=0, l2=1.0, out=str(tmp_path / "ref"),
    )
    written = fr.run(ns)
    artifact = json.loads(written["enc"].read_text())
    assert artifact["fit"]["k"] == 4 and artifact["fit"]["prompts"] >= 3
    assert set(written) == {"enc", "dec"}
    lines = (tmp_path / "ref" / "samples.jsonl").read_text().splitlines()
    assert len(lines) == artifact["fit"]["prompts"] and len(json.loads(lines[0])["rewards"]["enc"]) >= 2

    settings = make_settings([{"name": "enc", "path": str(tiny_bert), "device": "cpu",
                               "reference": {"type": "quantile", "path": str(written["enc"]), "q": 0.85}}])
    prompt = json.loads(lines[0])["prompt"]
    async for client in asgi_client(settings):
        r = await client.post("/v1/score", json={"items": [{"prompt": prompt, "response": "the dog"}]})
        assert r.status_code == 200, r.text
        ref = r.json()["results"][0]["references"]["enc"]
    mu, sigma = QuantilePredictor.load(written["enc"]).predict(prompt)
    assert ref == pytest.approx(mu + 1.0364333894937898 * sigma)
