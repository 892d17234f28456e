"""PPO against a live tiny service: what PPO must show, and exact resume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from service.cli import build_parser
from tests.conftest import LiveServer
from tests.tiny import make_tiny_bert, make_tiny_gpt2
from tests.trainer.test_train_rm import base_args, write_separable
from trainer import ppo


def _args(url: str, policy: Path, data: Path, out: Path, *extra: str) -> ppo.Args:
    ns = build_parser().parse_args([
        "ppo", "--policy", str(policy), "--data", str(data), "--service", url, "--models", "enc",
        "--method", "raw", "--batch-size", "8", "--minibatch-size", "4", "--max-new-tokens", "6",
        "--lora-r", "0", "--lr", "3e-3", "--gamma", "0.02", "--out", str(out), *extra])
    return ppo.args_from_namespace(ns)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("ppo")
    return make_tiny_gpt2(tmp / "policy", seed=6, lm=True), write_separable(tmp / "pairs.jsonl", n=120)


@pytest.fixture(scope="module")
def reward_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """A tiny BERT reward model trained on pairs that differ only in polite vs hostile words:
    a real preference for PPO to climb (a random tiny model's reward barely moves)."""
    from trainer import train_rm as tr

    tmp = tmp_path_factory.mktemp("ppo_rm")
    make_tiny_bert(tmp / "bert", seed=12)
    write_separable(tmp / "pairs.jsonl", n=300)
    # fp32 everywhere: with bf16 autocast on CPUs that have it, the reward model (and PPO's course) would differ
    result = tr.train_rm(base_args(tmp, str(tmp / "bert"), "rm", bf16=False))
    server = LiveServer({"models": [{"name": "enc", "path": str(result.out), "device": "cpu", "dtype": "float32"}],
                         "engine": {"max_wait_ms": 2, "threads": 1}}, tmp)
    try:
        yield server.wait_ready()
    finally:
        server.stop()


def test_ppo_moves_the_policy_up_the_reward_and_away_from_sft(reward_server: LiveServer, setup: tuple[Path, Path],
                                                              tmp_path: Path) -> None:
    policy, data = setup
    # A step's mean utility varies by about ±0.5 with its prompts and samples.  24 steps × 16 rollouts at lr 1e-3
    # moved too little to stand out of that (one CI run: 1.34 → 1.27).  32 steps × 32 rollouts at lr 2e-3 rose by
    # 0.3–2.7 between the first and last quarters in 12 runs here (4 seeds × 3 reward models; 1.1–2.2 with this
    # test's reward model), against a standard error of the difference of
    # about 0.25 (0.5 / √8 per 8-step mean, × √2).
    result = ppo.train(_args(reward_server.url, policy, data, tmp_path / "run", "--steps", "32", "--batch-size", "32",
                             "--minibatch-size", "8", "--lr", "2e-3"))
    h = result["history"]
    assert len(h) == 32
    assert h[0]["objective/kl"] == pytest.approx(0.0, abs=1e-6)  # the first rollout is the SFT policy's
    assert np.mean([x["objective/kl"] for x in h[-8:]]) > 0.1
    first, last = np.mean([x["reward/utility"] for x in h[:8]]), np.mean([x["reward/utility"] for x in h[-8:]])
    assert last > first, f"utility did not rise: {first:.4f} → {last:.4f}"
    for x in h:
        assert all(np.isfinite(v) for v in x.values())
        assert {"losses/policy", "losses/value", "losses/approx_kl", "losses/clipfrac", "objective/entropy",
                "time/generation", "time/scoring", "time/update", "reward/raw_enc"} <= set(x)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 32 and (tmp_path / "run" / "policy" / "config.json").is_file()


def test_a_stopped_run_resumes_exactly(reward_server: LiveServer, setup: tuple[Path, Path], tmp_path: Path) -> None:
    policy, data = setup
    straight = ppo.train(_args(reward_server.url, policy, data, tmp_path / "a", "--steps", "4", "--save-every", "2"))
    ppo.train(_args(reward_server.url, policy, data, tmp_path / "b", "--steps", "2", "--save-every", "2"))
    resumed = ppo.train(_args(reward_server.url, policy, data, tmp_path / "b", "--steps", "4", "--save-every", "2",
                              "--resume"))
    assert [h["step"] for h in resumed["history"]] == [3, 4]
    for a, b in zip(straight["history"][2:], resumed["history"]):
        assert b["reward/utility"] == pytest.approx(a["reward/utility"], abs=1e-6)
        assert b["objective/kl"] == pytest.approx(a["objective/kl"], abs=1e-5)
    steps = [json.loads(x)["step"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # nothing lost, nothing repeated


def test_lora_policy_uses_the_disabled_adapter_as_reference(reward_server: LiveServer, setup: tuple[Path, Path],
                                                            tmp_path: Path) -> None:
    policy, data = setup
    result = ppo.train(_args(reward_server.url, policy, data, tmp_path / "lora", "--steps", "3", "--lora-r", "4",
                             "--method", "log_sigmoid_sum"))
    assert result["history"][0]["objective/kl"] == pytest.approx(0.0, abs=1e-6)
    assert (tmp_path / "lora" / "policy" / "adapter_config.json").is_file()


def test_sweep_trains_evaluates_and_plots(live_server: LiveServer, setup: tuple[Path, Path], tmp_path: Path) -> None:
    from clients.client import RewardClient
    from trainer.evaluate import shortcuts
    from trainer.sampling import Sampler, SamplingArgs
    from trainer.samples import fill_bank, score_bank, select_prompts

    policy, data = setup
    bank = tmp_path / "bank.jsonl"
    prompts = select_prompts([str(data)], "align_heldout", 6)
    fill_bank(bank, prompts, lambda: Sampler(policy), 4, SamplingArgs(max_new_tokens=6), progress=False)
    with RewardClient(live_server.url) as client:
        score_bank(bank, client, ["enc", "dec"], progress=False)
    ns = build_parser().parse_args([
        "ppo-sweep", "--policy", str(policy), "--data", str(data), "--service", live_server.url, "--models", "enc",
        "--steps", "2", "--batch-size", "4", "--minibatch-size", "2", "--max-new-tokens", "6", "--lora-r", "0",
        "--methods", "raw", "transformed", "--gammas", "0.05", "--sweep-out", str(tmp_path / "sweep"),
        "--bank", str(bank), "--eval-prompts", "6", "--eval-max-new-tokens", "6", "--help-evaluator", "enc",
        "--harm-evaluator", "dec", "--report", str(tmp_path / "report")])
    assert ns.func(ns) == 0
    report = tmp_path / "report"
    assert {"report.md", "results.csv", "win_rate_vs_kl.png", "kl_matched_rewards.png", "shortcuts_vs_kl.png"} <= {
        p.name for p in report.iterdir()}
    rows = json.loads((report / "results.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["sft", "raw", "transformed"] and all(r["prompts"] == 6 for r in rows)
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the SFT policy against itself
    assert shortcuts("Here:\n1. flour\n2. eggs")["list"] and shortcuts("Please see a Therapist.")["professional"]
    assert not any(shortcuts("A dog is an animal.").values())


def test_the_report_says_when_nothing_moved() -> None:
    from trainer.evaluate import conclusion

    row = {"method": "raw", "kl": 0.01, "win_help": 0.1, "win_help_ci_low": 0.0, "win_help_ci_high": 0.2}
    assert conclusion([{**row, "method": "sft", "kl": 0.0}, row]).startswith("Not at this scale")
    far = [{**row, "kl": 2.0}, {**row, "method": "transformed", "kl": 2.1, "win_help": 0.6, "win_help_ci_low": 0.5,
                                 "win_help_ci_high": 0.7}]
    assert conclusion(far).startswith("Transformed beats raw")


def test_a_service_restart_mid_run_loses_no_step(tiny_bert: Path, setup: tuple[Path, Path], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The service goes away after step 2's rollouts and comes back on the same port 3 s later:
    the trainer waits (the client gives up quickly here, so the trainer's own wait loop runs too),
    takes no step on missing rewards, and its 4 steps equal those of an uninterrupted run."""
    import contextlib
    import threading

    import yaml

    from clients.client import RewardClient
    from clients.local import LocalService, free_port
    from trainer import samples

    policy, data = setup
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"models": [{"name": "enc", "path": str(tiny_bert), "device": "cpu",
                                                  "dtype": "float32"}], "engine": {"threads": 1}}))
    port = free_port()
    servers = [LocalService(config, tmp_path / "a.log", port=port).wait_ready()]
    failures: list[str] = []

    class RestartingClient(RewardClient):
        calls = 0

        def score(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            RestartingClient.calls += 1
            if RestartingClient.calls == 2:  # step 2's rewards: the service is gone, back in 3 s
                servers[0].stop()
                threading.Timer(3.0, lambda: servers.append(LocalService(config, tmp_path / "b.log",
                                                                         port=port))).start()
            try:
                return super().score(*args, **kwargs)
            except Exception as exc:
                failures.append(type(exc).__name__)
                raise

    @contextlib.contextmanager
    def quick_client(ns):  # type: ignore[no-untyped-def]
        with RestartingClient(f"http://127.0.0.1:{port}", max_retries=2, backoff_s=0.2) as client:
            yield client

    url = f"http://127.0.0.1:{port}"
    args = ["--steps", "4", "--save-every", "1", "--service-retry-s", "1"]
    try:
        monkeypatch.setattr(samples, "reward_client", quick_client)
        interrupted = ppo.train(_args(url, policy, data, tmp_path / "interrupted", *args))
        monkeypatch.undo()
        straight = ppo.train(_args(url, policy, data, tmp_path / "straight", *args))
    finally:
        for s in servers:
            s.stop()
    assert len(servers) == 2, "the service was not restarted"
    assert "ServiceUnavailable" in failures, "the outage was not seen by the trainer"
    assert [h["step"] for h in interrupted["history"]] == [1, 2, 3, 4]
    for a, b in zip(straight["history"], interrupted["history"]):
        assert b["reward/utility"] == pytest.approx(a["reward/utility"], abs=1e-5)
        assert b["objective/kl"] == pytest.approx(a["objective/kl"], abs=1e-5)
    steps = [json.loads(x)["step"] for x in (tmp_path / "interrupted" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_bf16_policy_trains_and_logs_to_tensorboard(reward_server: LiveServer, setup: tuple[Path, Path],
                                                    tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    policy, data = setup
    result = ppo.train(_args(reward_server.url, policy, data, tmp_path / "bf16", "--steps", "2", "--dtype", "bfloat16"))
    for x in result["history"]:
        assert all(np.isfinite(v) for v in x.values())
    events = EventAccumulator(str(tmp_path / "bf16" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"reward/utility", "objective/kl", "losses/policy", "time/update"} <= tags
    assert [e.step for e in events.Scalars("reward/utility")] == [1, 2]
    assert events.Scalars("reward/utility")[1].value == pytest.approx(result["history"][1]["reward/utility"], abs=1e-5)


def test_a_checkpoint_restores_every_generator_and_loads_without_pickle(tmp_path: Path) -> None:
    import pickle
    import random

    import torch

    model = torch.nn.Linear(3, 1)
    head = ppo.ValueHead(3)
    opt = torch.optim.Adam([*model.parameters(), *head.parameters()], lr=1e-3)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    for seed in (random.seed, np.random.seed, torch.manual_seed):
        seed(5)
    np.random.normal()  # a cached Gaussian is part of NumPy's state
    ppo.save_checkpoint(tmp_path / "ckpt.pt", 7, model, head, opt)
    expected = (random.random(), np.random.normal(size=3).tolist(), torch.rand(3).tolist())
    torch.load(tmp_path / "ckpt.pt", weights_only=True)  # plain tensors and values: no pickled objects inside
    for seed in (random.seed, np.random.seed, torch.manual_seed):
        seed(99)
    assert ppo.load_checkpoint(tmp_path / "ckpt.pt", model, head, opt) == 7
    assert (random.random(), np.random.normal(size=3).tolist(), torch.rand(3).tolist()) == expected
    evil = tmp_path / "evil.pt"
    torch.save({"step": 1, "policy": {}, "payload": Path("x")}, evil)  # an arbitrary object
    with pytest.raises(pickle.UnpicklingError):
        ppo.load_checkpoint(evil, model, head, opt)
