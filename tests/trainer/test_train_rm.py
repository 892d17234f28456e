"""Smoke runs of train-rm on tiny real models: BERT (LoRA and full) and GPT-2 (decoder path)."""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import pytest
import torch

from tests.tiny import CHAT_TEMPLATE, WORDS, make_tiny_bert, make_tiny_gpt2
from trainer import probe as probe_mod
from trainer import train_rm as tr
from trainer.data import load_preferences, split_pairs

GOOD = ["good", "please", "thanks", "kind", "polite", "great", "love", "safe", "sure", "help"]
BAD = ["bad", "rude", "hate", "kill", "steal", "hurt", "dangerous", "illegal", "weapon", "drug"]
TOPICS = ["cook", "bake", "recipe", "food", "water", "coffee", "tea", "dog", "cat", "bird",
          "fish", "car", "bike", "train", "city", "music", "song", "book", "movie", "game"]
assert set(GOOD + BAD + TOPICS) <= set(WORDS)  # the tiny tokenizers know every word


def write_separable(path: Path, n: int = 400, seed: int = 0) -> Path:
    """Pairs that differ only in polite vs. hostile words; everything else is shared noise."""
    rng = random.Random(seed)
    with path.open("w") as fh:
        for i in range(n):
            shared = " ".join(rng.choices(TOPICS, k=3))
            row = {
                "prompt": f"tell me about {' '.join(rng.choices(TOPICS, k=4))} {i}",
                "chosen": f"{shared} {' '.join(rng.choices(GOOD, k=2))}",
                "rejected": f"{shared} {' '.join(rng.choices(BAD, k=2))}",
            }
            fh.write(json.dumps(row) + "\n")
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("train_rm")
    make_tiny_bert(root / "bert")
    make_tiny_gpt2(root / "gpt2")
    make_tiny_gpt2(root / "gpt2chat", chat_template=CHAT_TEMPLATE)
    write_separable(root / "pairs.jsonl")
    return root


def base_args(root: Path, backbone: str, out: str, **kw: object) -> tr.TrainRMArgs:
    defaults: dict[str, object] = dict(
        data=[str(root / "pairs.jsonl")], out=str(root / out), backbone=backbone, max_length=64,
        heldout_fraction=0.5, train_splits=["rm_train", "align_train", "align_heldout"],
        eval_split="rm_heldout", epochs=4, batch_size=8, lr=3e-3, warmup_ratio=0.1, progress=False,
    )
    defaults.update(kw)
    return tr.TrainRMArgs(**defaults)  # type: ignore[arg-type]


def heldout_encodings(result: tr.TrainResult, root: Path) -> tuple[list, list]:
    pairs, _ = load_preferences(root / "pairs.jsonl")
    held = split_pairs(pairs, 0.5, 0)["rm_heldout"]
    fmt = result.formatter
    return ([fmt.encode(p.prompt, p.chosen) for p in held], [fmt.encode(p.prompt, p.rejected) for p in held])


def check_reload(result: tr.TrainResult, root: Path) -> None:
    """The saved directory scores exactly as the trained model did, and prefers chosen."""
    chosen, rejected = heldout_encodings(result, root)
    pad = result.card["pad_token_id"]
    types = tr.uses_token_types(result.tokenizer, result.card["style"])
    before = tr.score_encoded(result.model, chosen + rejected, pad, 16, bf16=False, token_types=types)
    model, tokenizer, card = tr.load_reward_model(result.out)
    assert card == result.card
    assert not model.training
    after = tr.score_encoded(model, chosen + rejected, pad, 16, bf16=False, token_types=types)
    assert torch.allclose(before, after, atol=1e-4), (before - after).abs().max()
    acc, _ = tr.pairwise_metrics(after[: len(chosen)], after[len(chosen):])
    assert acc >= 0.8
    # the reloaded tokenizer formats identically
    again = tr.Formatter(tokenizer, card["style"], card["max_length"]).encode("\n\nHuman: hi\n\nAssistant:", "good")
    assert again == result.formatter.encode("\n\nHuman: hi\n\nAssistant:", "good")


def check_card(card: dict, **expect: object) -> None:
    assert card["format"] == "logand-rm/1"
    for key in ("backbone", "adapter", "architecture", "style", "max_length", "data", "split", "sizes",
                "accuracy", "reward_stats", "config", "train_seconds", "versions"):
        assert key in card, key
    for key, value in expect.items():
        assert card[key] == value, key
    assert card["sizes"]["train_pairs"] > 250 and card["sizes"]["eval_pairs"] > 50
    assert card["sizes"]["skipped"] == {} and card["sizes"]["response_truncated"] == 0
    assert set(card["split"]) == {"seed", "heldout_fraction", "train_splits", "eval_split"}
    assert len(card["accuracy"]["per_epoch"]) == card["config"]["epochs"]
    assert card["accuracy"]["heldout"] >= 0.8
    stats = card["reward_stats"]
    assert stats["n"] == 2 * card["sizes"]["eval_pairs"]
    assert stats["heldout_std"] > 0 and stats["heldout_median"] is not None
    assert set(card["versions"]) == {"torch", "transformers", "peft"}


def test_lora_bert_learns_and_reloads(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(workdir)  # a relative backbone reference must be saved as given
    # a small token budget: each 8-pair step runs as several micro-batches
    result = tr.train_rm(base_args(workdir, "bert", "rm_lora", max_batch_tokens=160))
    card = result.card
    check_card(card, backbone="bert", adapter=True, architecture="encoder", style="pair", max_length=64)
    epochs = card["accuracy"]["per_epoch"]
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    assert epochs[-1]["heldout_loss"] < 0.5 < 0.693  # well below chance (log 2)

    out = result.out
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
    assert (out / "tokenizer.json").is_file() and not (out / "README.md").exists()
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "bert"
    assert {"classifier", "pooler"} <= set(adapter["modules_to_save"])
    assert not any("pooler" in t or "classifier" in t for t in adapter["target_modules"])
    from safetensors import safe_open

    with safe_open(str(out / "adapter_model.safetensors"), "pt") as fh:
        keys = list(fh.keys())
    assert any("pooler" in k for k in keys) and any("classifier" in k for k in keys)
    assert any("lora_A" in k for k in keys)
    check_reload(result, workdir)


def test_full_finetune_through_the_cli(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    tr.register(parser.add_subparsers())
    ns = parser.parse_args([
        "train-rm", "--data", str(workdir / "pairs.jsonl"), "--out", str(workdir / "rm_full"),
        "--backbone", str(workdir / "bert"), "--no-lora", "--no-bf16", "--max-length", "64",
        "--heldout-fraction", "0.5", "--train-splits", "rm_train", "align_train", "align_heldout",
        "--epochs", "3", "--batch-size", "8", "--lr", "1e-3", "--no-progress", "--center-coef", "0.01",
    ])
    assert ns.func is tr.main
    assert ns.func(ns) == 0
    printed = capsys.readouterr().out
    assert "held-out accuracy" in printed and str(workdir / "rm_full") in printed
    out = workdir / "rm_full"
    card = json.loads((out / "logand.json").read_text())
    check_card(card, adapter=False, architecture="encoder")
    assert card["config"]["lora"] is False and card["config"]["bf16"] is False
    assert card["config"]["center_coef"] == 0.01
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    model, _, _ = tr.load_reward_model(out)
    assert model.config.num_labels == 1


def test_cli_flags_mirror_the_dataclass() -> None:
    parser = argparse.ArgumentParser()
    tr.register(parser.add_subparsers())
    ns = parser.parse_args(["train-rm", "--data", "a.jsonl", "--data", "b.jsonl", "c.jsonl",
                            "--lora-targets", "query", "value", "--threads", "2"])
    args = tr.args_from_namespace(ns)
    assert args.data == ["a.jsonl", "b.jsonl", "c.jsonl"]
    assert args.lora_targets == ["query", "value"] and args.threads == 2
    assert args.train_splits == ["rm_train"] and args.lora is True and args.bf16 is None
    assert args.backbone == tr.DEFAULT_BACKBONE
    with pytest.raises(SystemExit):
        parser.parse_args(["train-rm"])  # --data is required


def test_cli_reports_bad_data_without_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing.jsonl"
    assert tr.main(tr.TrainRMArgs(data=[str(missing)], out=str(tmp_path / "o"))) == 2
    assert str(missing) in capsys.readouterr().err


@pytest.mark.parametrize("name, style", [("gpt2", "text"), ("gpt2chat", "chat")])
def test_decoder_reward_model(workdir: Path, name: str, style: str) -> None:
    # the chat run checks only the style choice and the saved head: a few pairs suffice
    quick = {} if style == "text" else {"epochs": 1, "max_pairs": 16, "max_eval_pairs": 8}
    result = tr.train_rm(base_args(workdir, str(workdir / name), f"rm_{name}", lr=5e-3, **quick))
    card = result.card
    assert card["architecture"] == "decoder" and card["style"] == style
    adapter = json.loads((result.out / "adapter_config.json").read_text())
    assert "score" in adapter["modules_to_save"] and adapter["fan_in_fan_out"] is True
    if style == "chat":
        return  # only the style choice; the text run below checks learning and reloading
    check_card(card, adapter=True)
    check_reload(result, workdir)


def test_decoder_reward_ignores_right_padding(workdir: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(workdir / "gpt2").eval()
    tok = AutoTokenizer.from_pretrained(workdir / "gpt2")
    fmt = tr.Formatter(tok, "text", 64)
    short = fmt.encode("\n\nHuman: tea?\n\nAssistant:", "yes good")
    long = fmt.encode("\n\nHuman: tell me about the city and the music\n\nAssistant:", "sure, here is a song")
    assert len(long) > len(short) + 3
    with torch.no_grad():
        alone = tr.reward_forward(model, **tr.collate([short], tok.pad_token_id, token_types=False))
        batch = tr.reward_forward(model, **tr.collate([short, long], tok.pad_token_id, token_types=False))
        # the pad id does not matter either (EOS as pad, as for models without a pad token)
        eos_pad = tr.reward_forward(model, **tr.collate([short, long], tok.eos_token_id, token_types=False))
        # HF's own pooling agrees when the pad id is distinct from every real token
        hf = model(**tr.collate([short, long], tok.pad_token_id, token_types=False)).logits[:, 0]
    assert alone.shape == (1,) and batch.shape == (2,)
    assert torch.allclose(alone[0], batch[0], atol=1e-5)
    assert torch.allclose(batch, eos_pad, atol=1e-5)
    assert torch.allclose(batch, hf, atol=1e-5)


def test_encoder_reward_ignores_right_padding(workdir: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(workdir / "bert").eval()
    tok = AutoTokenizer.from_pretrained(workdir / "bert")
    fmt = tr.Formatter(tok, "pair", 64)
    short = fmt.encode("\n\nHuman: tea?\n\nAssistant:", "yes good")
    long = fmt.encode("\n\nHuman: tell me about the city and the music\n\nAssistant:", "sure, here is a song")
    with torch.no_grad():
        alone = tr.reward_forward(model, **tr.collate([short], tok.pad_token_id))
        batch = tr.reward_forward(model, **tr.collate([short, long], tok.pad_token_id))
    assert torch.allclose(alone[0], batch[0], atol=1e-5)


def test_lora_targets_default_to_backbone_linears(workdir: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    bert = AutoModelForSequenceClassification.from_pretrained(workdir / "bert")
    names, conv = tr.lora_target_names(bert, None)
    assert not conv and len(names) == 2 * 6  # q, k, v, attn out, intermediate, output per layer
    assert {n.rsplit(".", 1)[-1] for n in names} == {"query", "key", "value", "dense"}
    assert tr.head_modules(bert) == ["classifier", "pooler"]
    gpt2 = AutoModelForSequenceClassification.from_pretrained(workdir / "gpt2")
    names, conv = tr.lora_target_names(gpt2, None)
    assert conv and {n.rsplit(".", 1)[-1] for n in names} == {"c_attn", "c_proj", "c_fc"}
    assert tr.head_modules(gpt2) == ["score"]
    with pytest.raises(ValueError, match="no Linear layer"):
        tr.lora_target_names(bert, ["nonexistent"])


def test_minilm_checkpoint_has_pooler_weights() -> None:
    """The default backbone's pooler loads from the checkpoint; only the classifier is new."""
    from safetensors import safe_open

    from service.modelpath import DEFAULT_BACKBONE, ModelNotFoundError, resolve_model_path

    try:
        path = Path(resolve_model_path(DEFAULT_BACKBONE))
    except ModelNotFoundError as exc:
        pytest.skip(str(exc))
    with safe_open(str(path / "model.safetensors"), "pt") as fh:
        keys = set(fh.keys())
    assert {"pooler.dense.weight", "pooler.dense.bias"} <= keys
    assert not any(k.startswith("classifier") for k in keys)


def test_probe_on_tiny_bert(workdir: Path) -> None:
    result = probe_mod.probe_accuracy(
        [str(workdir / "pairs.jsonl")], backbone=str(workdir / "bert"), max_length=64,
        heldout_fraction=0.5, train_splits=["rm_train", "align_train"],
    )
    assert 0.0 <= result["heldout_acc"] <= 1.0 and 0.0 <= result["train_acc"] <= 1.0
    assert result["train_pairs"] > 100 and result["eval_pairs"] > 50
    assert result["style"] == "pair"


def test_micro_batches_accumulate_to_the_full_batch_step(workdir: Path) -> None:
    """Splitting a step by the token budget changes the schedule of forwards, not the update."""
    runs = []
    for budget in (10_000, 100):
        args = base_args(workdir, str(workdir / "bert"), f"rm_budget{budget}", epochs=1, max_pairs=48,
                         batch_size=16, max_batch_tokens=budget, bf16=False, lora=False, lr=1e-3)
        runs.append(tr.train_rm(args))
    whole, split = (r.card["accuracy"]["per_epoch"][0] for r in runs)
    assert whole["train_loss"] == pytest.approx(split["train_loss"], abs=1e-5)
    # Adam magnifies float noise on near-zero gradients, so later numbers agree less tightly
    assert whole["heldout_loss"] == pytest.approx(split["heldout_loss"], abs=1e-3)
