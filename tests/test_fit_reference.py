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
from service.cli import build_parser
from trainer import fit_reference as fr


def ns_args(ns: argparse.Namespace) -> list[str]:
    return ["--policy", ns.policy, "--data", *ns.data, "--service", ns.service, "--models", *ns.models,
            "--prompts", str(ns.prompts), "--k", str(ns.k), "--max-new-tokens", str(ns.max_new_tokens),
            "--batch-size", str(ns.batch_size), "--out", ns.out]


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
    ns = build_parser().parse_args([
        "fit-reference", "--policy", str(policy), "--data", str(data), "--service", live_server.url,
        "--models", "enc", "dec", "--prompts", "4", "--k", "4", "--max-new-tokens", "8", "--batch-size", "2",
        "--out", str(tmp_path / "ref"),
    ])
    written = fr.run(ns)
    artifact = json.loads(written["enc"].read_text())
    assert artifact["fit"]["k"] == 4 and artifact["fit"]["prompts"] >= 3
    assert set(written) == {"enc", "dec"}
    bank = tmp_path / "ref" / "samples.jsonl"
    lines = bank.read_text().splitlines()
    assert len(lines) == 4 and all(len(json.loads(x)["rewards"]["enc"]) == len(json.loads(x)["samples"]) for x in lines)

    # a rerun resumes: nothing is sampled or scored again, and the fit is the same
    before = bank.read_text()
    again = fr.run(build_parser().parse_args(["fit-reference", *ns_args(ns)]))
    assert bank.read_text() == before
    assert json.loads(again["enc"].read_text())["mean"] == artifact["mean"]

    settings = make_settings([{"name": "enc", "path": str(tiny_bert), "device": "cpu",
                               "reference": {"type": "quantile", "path": str(written["enc"]), "q": 0.85}}])
    prompt = json.loads(lines[0])["prompt"]
    async for client in asgi_client(settings):
        r = await client.post("/v1/score", json={"items": [{"prompt": prompt, "response": "the dog"}]})
        assert r.status_code == 200, r.text
        ref = r.json()["results"][0]["references"]["enc"]
    mu, sigma = QuantilePredictor.load(written["enc"]).predict(prompt)
    assert ref == pytest.approx(mu + 1.0364333894937898 * sigma)


def test_scoring_a_bank_waits_out_a_service_restart(tiny_bert: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The service is stopped after the first scored prompt and restarted on the same port a
    moment later: the client's retries wait it out, every prompt is scored exactly once, and the
    rewards equal those of an uninterrupted run."""
    import threading

    import yaml

    from clients.client import RewardClient
    from clients.local import LocalService, free_port
    from trainer import samples

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"models": [{"name": "enc", "path": str(tiny_bert), "device": "cpu"}],
                                      "engine": {"threads": 1}}))
    records = [{"prompt": f"\n\nHuman: question {i}\n\nAssistant:", "samples": [f"answer {i}", f"reply {i} ok"],
                "rewards": {}} for i in range(4)]
    samples.write_bank(tmp_path / "bank.jsonl", records)
    monkeypatch.setattr(samples, "SCORE_CHUNK_PROMPTS", 1)
    port = free_port()
    servers = [LocalService(config, tmp_path / "a.log", port=port).wait_ready()]

    class RestartingClient(RewardClient):
        calls = 0

        def score(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            RestartingClient.calls += 1
            if RestartingClient.calls == 2:  # after the first prompt: stop, and come back in 2 s
                servers[0].stop()
                threading.Timer(2.0, lambda: servers.append(LocalService(config, tmp_path / "b.log", port=port))).start()
            return super().score(*args, **kwargs)

    try:
        with RestartingClient(f"http://127.0.0.1:{port}", max_retries=10, backoff_s=0.5) as client:
            assert samples.score_bank(tmp_path / "bank.jsonl", client, ["enc"], progress=False) == 4
            scored = samples.read_bank(tmp_path / "bank.jsonl")
            direct = client.score([(r["prompt"], s) for r in records for s in r["samples"]], models=["enc"])
    finally:
        for s in servers:
            s.stop()
    assert len(servers) == 2, "the service was not restarted"
    assert [len(r["rewards"]["enc"]) for r in scored] == [2, 2, 2, 2]
    assert [x for r in scored for x in r["rewards"]["enc"]] == pytest.approx([d.rewards["enc"] for d in direct],
                                                                               abs=1e-5)


def test_leave_one_out_error_equals_refitting_without_each_prompt() -> None:
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(15, 40)), rng.normal(size=15)
    brute = []
    for i in range(15):
        keep = np.arange(15) != i
        w, b = fr.ridge(x[keep], y[keep], 0.7)
        brute.append(float(x[i] @ w + b - y[i]))
    # the dual solution centres y on the kept prompts' mean; the hat-matrix form on all of them,
    # which is the same fit up to that centring: agree to a few percent at n = 15
    assert fr.loo_error(x, y, 0.7) == pytest.approx(float(np.sqrt(np.mean(np.square(brute)))), rel=0.1)


def test_predictive_sigma_adds_the_mean_models_error() -> None:
    prompts = [f"prompt {i} about {'cats' if i % 2 else 'dogs'}" for i in range(30)]
    rng = np.random.default_rng(0)
    means, stds = rng.normal(size=30).tolist(), [0.5] * 30
    plain = QuantilePredictor(fr.fit_predictor(prompts, means, stds, predictive=False), "p")
    served = QuantilePredictor(fr.fit_predictor(prompts, means, stds, predictive=True), "s")
    assert plain.mean_error == 0 and served.mean_error > 0.3  # noise means: the mean model knows little
    mu_p, sd_p = plain.predict("prompt 99 about cats")
    mu_s, sd_s = served.predict("prompt 99 about cats")
    assert mu_p == pytest.approx(mu_s) and sd_s == pytest.approx(float(np.hypot(sd_p, served.mean_error)))
