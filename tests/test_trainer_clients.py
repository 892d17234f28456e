"""TRL and verl reward functions against a live tiny service; a real TRL GRPOTrainer run."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import httpx
import pytest

from clients.trainers import AsyncLogandReward, LogandReward, as_pair
from tests.conftest import LiveServer
from tests.tiny import CHAT_TEMPLATE, make_tiny_gpt2

PROMPTS = ["\n\nHuman: how do i bake a cake\n\nAssistant:", "\n\nHuman: what is a dog\n\nAssistant:"]
COMPLETIONS = [" Mix flour and eggs.", " A dog is an animal."]


def _expected(server: LiveServer, pairs: list) -> list[dict]:
    items = [{"prompt": p, "response": r} for p, r in pairs]
    return httpx.post(server.url + "/v1/score", json={"items": items, "models": ["enc"]}).json()["results"]


def test_as_pair_reads_plain_and_conversational_forms() -> None:
    assert as_pair("q", " a") == ("q", " a")
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "q"}]}]
    assert as_pair(messages, [{"role": "assistant", "content": "a"}]) == (
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q"}], "a")


async def test_sync_and_async_reward_functions_return_the_service_utility(live_server: LiveServer) -> None:
    logged: dict[str, float] = {}
    sync = LogandReward(live_server.url, models=["enc"])
    got = sync(PROMPTS, COMPLETIONS, log_metric=lambda k, v: logged.__setitem__(k, v), trainer_state=None)
    expected = _expected(live_server, list(zip(PROMPTS, COMPLETIONS)))
    assert got == pytest.approx([e["utility"] for e in expected], abs=1e-5)
    assert "logand/enc/raw_reward" in logged
    conv_prompts = [[{"role": "user", "content": "how do i bake a cake"}]] * 2
    conv_completions = [[{"role": "assistant", "content": c}] for c in COMPLETIONS]
    got_async = await AsyncLogandReward(live_server.url, models=["enc"])(conv_prompts, conv_completions)
    expected = _expected(live_server, [(conv_prompts[0], c.strip()) for c in COMPLETIONS])
    assert got_async == pytest.approx([e["utility"] for e in expected], abs=1e-4)


def test_verl_compute_score_per_sample_and_batched(live_server: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOGAND_URL", live_server.url)
    monkeypatch.setenv("LOGAND_MODELS", "enc")
    spec = importlib.util.spec_from_file_location("verl_reward_file", Path("clients/verl_reward.py").resolve())
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)  # loaded from its path, as verl does
    spec.loader.exec_module(module)
    infos = [{"prompt": p} for p in PROMPTS]
    expected = _expected(live_server, list(zip(PROMPTS, COMPLETIONS)))
    one = module.compute_score("hh", COMPLETIONS[0], None, infos[0])
    assert one["score"] == pytest.approx(expected[0]["utility"], abs=1e-5) and "enc_reward" in one
    batch = module.compute_score_batch(["hh", "hh"], COMPLETIONS, [None, None], infos)
    assert [b["score"] for b in batch] == pytest.approx([e["utility"] for e in expected], abs=1e-5)
    with pytest.raises(ValueError, match="extra_info has no 'prompt'"):
        module.compute_score("hh", "x", None, {})


def test_trl_grpo_trainer_runs_two_steps_against_the_service(live_server: LiveServer, tmp_path: Path) -> None:
    trl = pytest.importorskip("trl", reason="TRL is in the 'trainers' extra")
    datasets = pytest.importorskip("datasets")
    policy = make_tiny_gpt2(tmp_path / "policy", seed=4, chat_template=CHAT_TEMPLATE, lm=True)
    data = datasets.Dataset.from_dict({"prompt": [[{"role": "user", "content": f"tell me about the dog {i}"}]
                                                  for i in range(4)]})
    args = trl.GRPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=2,
                          max_completion_length=6, max_steps=2, logging_steps=1, report_to="none", use_cpu=True,
                          bf16=False, save_strategy="no", seed=0, dataloader_num_workers=0)
    sync, async_ = LogandReward(live_server.url, models=["enc"]), AsyncLogandReward(live_server.url, models=["enc"])
    trainer = trl.GRPOTrainer(model=str(policy), reward_funcs=[sync, async_], args=args, train_dataset=data)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "reward" in h]
    assert trainer.state.global_step == 2 and len(logs) == 2
    assert all(f"rewards/{name}/mean" in logs[0] for name in ("logand", "logand_async"))
    assert all(h["rewards/logand/mean"] < 0 for h in logs)  # a log σ utility is negative


async def test_an_empty_completion_gets_the_empty_utility_not_an_error(live_server: LiveServer) -> None:
    from clients.trainers import EMPTY_UTILITY

    got = LogandReward(live_server.url, models=["enc"])(PROMPTS, ["", COMPLETIONS[1]])
    assert got[0] == EMPTY_UTILITY and got[1] == pytest.approx(_expected(live_server, [(PROMPTS[1], COMPLETIONS[1])])[0]["utility"], abs=1e-5)
    assert await AsyncLogandReward(live_server.url, models=["enc"])(PROMPTS[:1], ["  "]) == [EMPTY_UTILITY]


def test_openrlhf_reward_file_reaches_a_keyed_service(tiny_bert: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """OpenRLHF's URL mode sends no Authorization header; its .py mode runs this file, which does."""
    import torch

    from tests.conftest import enc_dec_config

    config = enc_dec_config(tiny_bert, tiny_bert)
    del config["models"][1]
    server = LiveServer(config, tmp_path, env={"LOGAND_API_KEY": "k-openrlhf"})
    try:
        server.wait_ready(headers={"Authorization": "Bearer k-openrlhf"})
        queries = [p + c for p, c in zip(PROMPTS, COMPLETIONS)] * 3
        prompts = PROMPTS * 3
        assert httpx.post(server.url + "/get_reward", json={"query": queries, "prompts": prompts}).status_code == 401
        direct = httpx.post(server.url + "/get_reward", json={"query": queries, "prompts": prompts},
                            headers={"Authorization": "Bearer k-openrlhf"}).json()
        spec = importlib.util.spec_from_file_location("openrlhf_reward_file", Path("clients/openrlhf_reward.py").resolve())
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)  # loaded from its path, as OpenRLHF does
        spec.loader.exec_module(module)
        monkeypatch.setenv("LOGAND_URL", server.url)
        monkeypatch.setenv("LOGAND_API_KEY", "k-openrlhf")
        from clients.client import client_from_env

        monkeypatch.setattr(client_from_env(), "chunk_size", 4)  # 6 queries: two requests, joined in order
        out = module.reward_func(queries, prompts, ["label"] * 6)
        assert out["rewards"].dtype == torch.float32 and out["rewards"].shape == (6,)
        assert out["rewards"].tolist() == pytest.approx(direct["rewards"], abs=1e-5)
        assert out["scores"].tolist() == pytest.approx(direct["scores"], abs=1e-5)
        assert set(out["extra_logs"]) == set(direct["extra_logs"]) == {"enc/reward", "enc/utility", "enc/truncated"}
        assert out["extra_logs"]["enc/reward"].tolist() == pytest.approx(direct["extra_logs"]["enc/reward"], abs=1e-5)
        monkeypatch.setenv("LOGAND_API_KEY", "wrong")
        from clients.client import RequestRejected

        with pytest.raises(RequestRejected, match="401"):
            module.reward_func(queries[:1], prompts[:1])
    finally:
        server.stop()
