"""A directory written by train-rm is served as it is, and scores as the trainer's model did."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import asgi_client, make_settings
from tests.tiny import make_tiny_bert
from tests.trainer.test_train_rm import base_args, heldout_encodings, write_separable
from trainer import train_rm as tr
from trainer.data import load_preferences, split_pairs


@pytest.mark.parametrize("lora", [True, False])
async def test_trained_directory_loads_in_the_service_and_scores(tmp_path: Path, lora: bool) -> None:
    make_tiny_bert(tmp_path / "bert")
    write_separable(tmp_path / "pairs.jsonl")
    result = tr.train_rm(base_args(tmp_path, str(tmp_path / "bert"), "rm", lora=lora, epochs=3))
    chosen, rejected = heldout_encodings(result, tmp_path)
    trainer_scores = tr.score_encoded(result.model, chosen + rejected, result.card["pad_token_id"], 16,
                                      bf16=False, token_types=tr.uses_token_types(result.tokenizer, result.card["style"]))
    held = split_pairs(load_preferences(tmp_path / "pairs.jsonl")[0], 0.5, 0)["rm_heldout"]
    items = [{"prompt": p.prompt, "response": getattr(p, side)} for side in ("chosen", "rejected") for p in held]
    settings = make_settings([{"name": "rm", "path": str(result.out), "device": "cpu", "dtype": "float32"}])
    async for client in asgi_client(settings):
        r = await client.post("/v1/score", json={"items": items, "method": "raw"})
        assert r.status_code == 200, r.text
        served = [res["rewards"]["rm"] for res in r.json()["results"]]
        info = r.json()["models"]["rm"]
    assert info["style"] == result.card["style"] and info["max_length"] == result.card["max_length"]
    assert served == pytest.approx(trainer_scores.tolist(), abs=1e-4)
    n = len(held)
    accuracy = sum(c > r for c, r in zip(served[:n], served[n:])) / n
    assert accuracy >= 0.8
