"""``logand train-rm``: train a Bradley–Terry reward model on preference pairs.

Reads top to bottom: arguments → helpers (architecture, padding, the one reward forward) →
model loading/saving → the training loop → the CLI.  The loss is the paper's
``−log σ(r⁺ − r⁻)``, plus an optional centering term ``λ·(r⁺ + r⁻)²`` (Eisenstein et al. 2023)
that pins the free per-prompt shift of the rewards near zero.

The output directory is what the service loads (:func:`load_reward_model`): a LoRA adapter
(``adapter_config.json`` + ``adapter_model.safetensors``, head modules included) whose
``base_model_name_or_path`` is the backbone *reference* (``pkg:…`` or a hub name, never a path
of this machine), or a full model for ``--no-lora``; the tokenizer; and ``logand.json``, the
card with the formatting settings, the split, accuracy and held-out reward statistics.

Tokenization goes through :class:`service.formatting.Formatter` so training and serving format
(prompt, response) identically.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import sys
import time
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from service.backends.base import pad_batch
from service.backends.modeling import cpu_has_native_bf16, is_decoder_config, reward_forward, unwrap
from service.formatting import Encoded, Formatter, Style
from service.modelpath import DEFAULT_BACKBONE, resolve_model_path
from trainer.data import SPLITS, DataError, PreferencePair, length_batches, load_many, split_pairs

CARD_NAME = "logand.json"
CARD_FORMAT = "logand-rm/1"


# -- arguments -----------------------------------------------------------------------------
def _arg(default: Any = MISSING, help: str = "", **kw: Any) -> Any:
    """A dataclass field whose ``help`` is its one documentation (the CLI flag reuses it)."""
    if isinstance(default, list):
        items = list(default)
        return field(default_factory=lambda: list(items), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainRMArgs:
    data: list[str] = _arg([], "preference sources: .jsonl/.jsonl.gz files (HH transcripts or "
                           "{prompt, chosen, rejected}) or hub:NAME[:DATA_DIR][@SPLIT]; repeatable",
                           required=True)
    out: str = _arg("runs/rm", "output directory (adapter or model, tokenizer, logand.json)")
    backbone: str = _arg(DEFAULT_BACKBONE, "base model: pkg:MODULE/dir, a local directory or a hub name")
    style: str | None = _arg(None, "input format: pair (encoders), chat (tokenizer has a chat "
                             "template) or text; default chosen from the backbone",
                             choices=["pair", "chat", "text"])
    max_length: int = _arg(256, "tokens per (prompt, response); the prompt is cut from the left first")
    append_eos: bool = _arg(False, "append the EOS token after the response (decoders)")
    train_splits: list[str] = _arg(["rm_train"], "prompt splits to train on: " + ", ".join(SPLITS),
                                   choices=list(SPLITS), metavar="SPLIT")
    eval_split: str = _arg("rm_heldout", "prompt split for held-out accuracy and reward statistics",
                           choices=list(SPLITS), metavar="SPLIT")
    heldout_fraction: float = _arg(0.2, "fraction of each half of the prompts held out")
    seed: int = _arg(0, "seed of the split, the initialisation, dropout and batch order")
    epochs: int = _arg(1, "passes over the training pairs")
    batch_size: int = _arg(16, "pairs per optimisation step (2x sequences per forward)")
    eval_batch_size: int = _arg(32, "sequences per forward when evaluating")
    max_batch_tokens: int | None = _arg(None, "padded tokens per forward (chosen + rejected); a step "
                                        "over it runs as micro-batches with gradient accumulation; "
                                        "default 2048 on CPU (memory-bound beyond), 65536 on GPU")
    lr: float | None = _arg(None, "peak learning rate; default 2e-4 with LoRA, 3e-5 full fine-tuning")
    weight_decay: float = _arg(0.0, "AdamW weight decay (not applied to biases and norms)")
    warmup_ratio: float = _arg(0.05, "fraction of the steps with linear warm-up; then linear decay to 0")
    max_grad_norm: float = _arg(1.0, "gradient-norm clip (0 disables)")
    lora: bool = _arg(True, "train a LoRA adapter (else fine-tune every weight)")
    lora_r: int = _arg(8, "LoRA rank")
    lora_alpha: int = _arg(16, "LoRA scale numerator (scale = alpha / r)")
    lora_dropout: float = _arg(0.0, "dropout on the LoRA input")
    lora_targets: list[str] | None = _arg(None, "names of the Linear layers that get LoRA; default "
                                          "every Linear of the backbone (BERT: query key value dense)")
    dropout: bool = _arg(False, "keep the backbone's dropout; off by default, as in TRL's reward "
                         "trainer: steadier rewards, and on CPU dropout masks cost as much as matmuls")
    center_coef: float = _arg(0.0, "reward-centering coefficient λ: adds λ·(r⁺ + r⁻)² to the loss")
    bf16: bool | None = _arg(None, "bf16 autocast; default on where the CPU/GPU runs bf16 natively")
    threads: int | None = _arg(None, "torch CPU threads (default: torch's choice)")
    device: str | None = _arg(None, "cpu or cuda[:N]; default cuda when available")
    max_pairs: int | None = _arg(None, "use at most this many training pairs (a seeded sample)")
    max_eval_pairs: int | None = _arg(None, "use at most this many held-out pairs (a seeded sample)")
    progress: bool = _arg(True, "show a progress bar")


# -- helpers -------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def bf16_default(device: torch.device) -> bool:
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    return device.type == "cpu" and cpu_has_native_bf16()


def default_style(decoder: bool, tokenizer: Any) -> Style:
    if not decoder:
        return "pair"
    return "chat" if getattr(tokenizer, "chat_template", None) else "text"


def ensure_pad_token(tokenizer: Any, decoder: bool) -> int:
    """The pad id, giving decoders one if they lack it: UNK if distinct from EOS, else EOS.

    :func:`reward_forward` finds the last real token from the attention mask, so the pad id
    only matters to code that calls the HF model directly (it pools at the first pad id).
    """
    if tokenizer.pad_token_id is None:
        if not decoder:
            raise ValueError("the encoder's tokenizer has no pad token")
        unk, eos = tokenizer.unk_token_id, tokenizer.eos_token_id
        tokenizer.pad_token = tokenizer.unk_token if unk is not None and unk != eos else tokenizer.eos_token
    return int(tokenizer.pad_token_id)


def disable_dropout(model: nn.Module) -> None:
    """Zero every dropout: the modules (covers attention kernels that read ``dropout.p``) and
    the config's rates (covers code that reads the config at call time)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    for name, value in list(vars(model.config).items()):
        if ("dropout" in name or "pdrop" in name) and isinstance(value, float):
            setattr(model.config, name, 0.0)


def architecture_of(model: nn.Module) -> str:
    inner = unwrap(model)
    return "decoder" if is_decoder_config(inner.config) else "encoder"


def collate(
    encodings: Sequence[Encoded], pad_id: int, token_types: bool = True, device: str | torch.device = "cpu"
) -> dict[str, Tensor]:
    """Right-pad encodings into tensors for :func:`reward_forward` (the service's padding)."""
    ids_np, mask_np, types_np = pad_batch(encodings, pad_id, token_types)  # each (B, T)
    ids, mask = torch.from_numpy(ids_np), torch.from_numpy(mask_np)
    types = torch.from_numpy(types_np) if types_np is not None else None
    out = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
    if types is not None:
        out["token_type_ids"] = types.to(device)
    return out


def uses_token_types(tokenizer: Any, style: str) -> bool:
    return style == "pair" and "token_type_ids" in getattr(tokenizer, "model_input_names", ())


@torch.no_grad()
def score_encoded(
    model: nn.Module, encodings: Sequence[Encoded], pad_id: int, batch_size: int = 32,
    bf16: bool = False, token_types: bool = True, max_tokens: int | None = None,
) -> Tensor:
    """Rewards (N,) in input order, computed in length-sorted batches (little padding) of at
    most ``batch_size`` sequences and ``max_tokens`` padded tokens."""
    device = next(model.parameters()).device
    out = torch.empty(len(encodings), dtype=torch.float32)
    for batch in length_batches([len(e) for e in encodings], batch_size, seed=None, max_tokens=max_tokens):
        inputs = collate([encodings[i] for i in batch], pad_id, token_types, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out[batch] = reward_forward(model, **inputs).float().cpu()
    return out


def pairwise_metrics(chosen: Tensor, rejected: Tensor) -> tuple[float, float]:
    """(accuracy with ties as 0.5, mean BT loss) of rewards of shape (N,)."""
    if chosen.numel() == 0:
        return float("nan"), float("nan")
    margin = chosen - rejected
    acc = ((margin > 0).float() + 0.5 * (margin == 0).float()).mean()
    return float(acc), float(-F.logsigmoid(margin).mean())


# -- model ---------------------------------------------------------------------------------
def head_modules(model: nn.Module) -> list[str]:
    """Modules trained in full and saved with an adapter: the scoring head, and the encoder's
    pooler (the head reads [CLS] through it; it is kept even where the checkpoint has one)."""
    prefix = model.base_model_prefix
    heads = [n for n, m in model.named_children() if n != prefix and any(True for _ in m.parameters())]
    base = getattr(model, prefix, None)  # type: ignore[union-attr,operator,call-overload]
    if base is not None and getattr(base, "pooler", None) is not None:
        heads.append("pooler")
    return heads


def lora_target_names(model: nn.Module, leaf_names: Sequence[str] | None) -> tuple[list[str], bool]:
    """Full names of the Linear/Conv1D layers that get LoRA, outside the head modules, and
    whether any is a GPT-2 Conv1D (weights stored transposed: peft's fan_in_fan_out)."""
    from transformers.pytorch_utils import Conv1D

    heads = head_modules(model)
    prefix = model.base_model_prefix
    skip = tuple(f"{h}." for h in heads if h != "pooler") + (f"{prefix}.pooler.",)
    chosen: list[str] = []
    conv = False
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, Conv1D)) or name.startswith(skip) or name in heads:
            continue
        if leaf_names is None or name.rsplit(".", 1)[-1] in leaf_names:
            chosen.append(name)
            conv = conv or isinstance(module, Conv1D)
    if not chosen:
        raise ValueError(f"no Linear layer matches the LoRA targets {list(leaf_names or [])}")
    return chosen, conv


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report where its news is expected (a head the checkpoint
    lacks, or drops, by design)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def load_reward_model(
    path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[nn.Module, Any, dict[str, Any] | None]:
    """(eval-mode model, tokenizer, card or None) of a reward-model directory, loaded exactly as
    the service loads it (:func:`service.backends.modeling.load_reward_model`)."""
    from service.backends import modeling

    name = next(k for k, v in modeling.DTYPES.items() if v == dtype)
    with quiet_transformers():
        loaded = modeling.load_reward_model(path, dtype=name, device=str(device))
    ensure_pad_token(loaded.tokenizer, is_decoder_config(loaded.model.config))
    return loaded.model, loaded.tokenizer, loaded.card


# -- training ------------------------------------------------------------------------------
@dataclass
class TrainResult:
    card: dict[str, Any]
    model: nn.Module  # the trained model as in memory (peft-wrapped with LoRA), eval mode
    tokenizer: Any
    formatter: Formatter
    out: Path


def _sample(pairs: list[PreferencePair], limit: int | None, seed: int) -> list[PreferencePair]:
    if limit is None or len(pairs) <= limit:
        return pairs
    keep = sorted(random.Random(seed).sample(range(len(pairs)), limit))
    return [pairs[i] for i in keep]


def _lr_lambda(total: int, warmup: int) -> Any:
    def mult(step: int) -> float:
        up = (step + 1) / max(1, warmup)
        down = (total - step) / max(1, total - warmup)
        return max(0.0, min(1.0, up, down))

    return mult


def train_rm(args: TrainRMArgs) -> TrainResult:
    """Train, evaluate, save; returns the card written to ``logand.json`` and the model."""
    import peft
    import transformers
    from peft import LoraConfig, TaskType, get_peft_model
    from tqdm.auto import tqdm
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    bf16 = bf16_default(device) if args.bf16 is None else args.bf16
    max_tokens = args.max_batch_tokens or (2048 if device.type == "cpu" else 65536)
    bad = [s for s in [*args.train_splits, args.eval_split] if s not in SPLITS]
    if bad:
        raise ValueError(f"unknown split(s) {bad}; choose from {list(SPLITS)}")

    # data
    pairs, report = load_many(args.data)
    print(f"data: {report.summary()}")
    splits = split_pairs(pairs, args.heldout_fraction, args.seed)
    train_pairs = _sample([p for s in dict.fromkeys(args.train_splits) for p in splits[s]], args.max_pairs, args.seed)
    eval_pairs = _sample(splits[args.eval_split] if args.eval_split not in args.train_splits else [],
                         args.max_eval_pairs, args.seed)
    if not train_pairs:
        raise DataError(f"no training pairs in splits {args.train_splits} of {args.data}")
    print("split: " + ", ".join(f"{k} {len(v)}" for k, v in splits.items())
          + f"; training on {len(train_pairs)}, evaluating on {len(eval_pairs)}")

    # tokenizer and formatting (the service formats with the same settings, from the card)
    model_path = resolve_model_path(args.backbone)
    config = AutoConfig.from_pretrained(model_path)
    decoder = is_decoder_config(config)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    style: Style = args.style or default_style(decoder, tokenizer)  # type: ignore[assignment]
    pad_id = ensure_pad_token(tokenizer, decoder)
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and args.max_length > positions:
        raise ValueError(f"max_length {args.max_length} is over the backbone's {positions} positions")
    formatter = Formatter(tokenizer, style, args.max_length, append_eos=args.append_eos)
    types = uses_token_types(tokenizer, style)

    def encode(ps: list[PreferencePair]) -> tuple[list[Encoded], list[Encoded], int, int]:
        good = [formatter.encode(p.prompt, p.chosen, allow_truncation=True) for p in ps]
        bad_ = [formatter.encode(p.prompt, p.rejected, allow_truncation=True) for p in ps]
        cut = sum(g.response_truncated or b.response_truncated for g, b in zip(good, bad_))
        prompt_cut = sum(bool(g.truncated or b.truncated) for g, b in zip(good, bad_))
        return good, bad_, cut, prompt_cut

    train_c, train_r, train_cut, train_pcut = encode(train_pairs)
    eval_c, eval_r, eval_cut, eval_pcut = encode(eval_pairs)
    print(f"format: style {style}, max_length {args.max_length}; pairs with a cut response: "
          f"{train_cut + eval_cut}, with any cut: {train_pcut + eval_pcut}")

    # model
    seed_everything(args.seed)
    model: nn.Module = AutoModelForSequenceClassification.from_pretrained(
        model_path, num_labels=1, dtype=torch.float32
    )
    model.config.pad_token_id = pad_id  # type: ignore[union-attr,operator,call-overload]
    if not args.dropout:
        disable_dropout(model)
    if args.lora:
        targets, conv = lora_target_names(model, args.lora_targets)
        lora_cfg = LoraConfig(
            task_type=TaskType.SEQ_CLS, r=args.lora_r, lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout, target_modules=targets,
            modules_to_save=head_modules(model), fan_in_fan_out=conv,
        )
        model = get_peft_model(model, lora_cfg)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in params)
    n_all = sum(p.numel() for p in model.parameters())
    print(f"model: {args.backbone} ({'decoder' if decoder else 'encoder'}), "
          f"{'LoRA r=' + str(args.lora_r) if args.lora else 'full fine-tuning'}, "
          f"{n_train:,} of {n_all:,} parameters trained, bf16 autocast {'on' if bf16 else 'off'}, "
          f"device {device}, {torch.get_num_threads()} threads")

    lr = args.lr if args.lr is not None else (2e-4 if args.lora else 3e-5)
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
    )
    lengths = [max(len(c), len(r)) for c, r in zip(train_c, train_r)]
    steps_per_epoch = math.ceil(len(train_pairs) / args.batch_size)
    total = max(1, steps_per_epoch * args.epochs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(total, int(args.warmup_ratio * total)))

    def evaluate(fast: bool) -> tuple[Tensor, Tensor]:
        model.eval()
        rewards = score_encoded(model, eval_c + eval_r, pad_id, args.eval_batch_size, fast, types, max_tokens)
        return rewards[: len(eval_c)], rewards[len(eval_c):]

    history: list[dict[str, Any]] = []
    train_time = 0.0
    held_c = held_r = torch.empty(0)
    for epoch in range(args.epochs):
        model.train()
        t0 = time.perf_counter()
        losses, accs = [], []
        bar = tqdm(length_batches(lengths, args.batch_size, seed=args.seed + epoch),
                   desc=f"epoch {epoch + 1}/{args.epochs}", disable=not args.progress, leave=False)
        for batch in bar:
            optimizer.zero_grad(set_to_none=True)
            step_loss, step_acc = 0.0, 0.0
            # a step's pairs run as micro-batches within the token budget (2 sequences a pair)
            for part in length_batches([lengths[i] for i in batch], len(batch), None, max(1, max_tokens // 2)):
                micro = [batch[j] for j in part]
                # chosen and rejected in one forward: rows [0, b) chosen, [b, 2b) rejected
                inputs = collate([train_c[i] for i in micro] + [train_r[i] for i in micro], pad_id, types, device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    rewards = reward_forward(model, **inputs).float()  # (2b,)
                good, worse = rewards[: len(micro)], rewards[len(micro):]  # (b,), (b,)
                # sums over the micro-batch / step size: the accumulated gradient is the step mean
                loss = -F.logsigmoid(good - worse).sum() / len(batch)
                if args.center_coef:
                    loss = loss + args.center_coef * (good + worse).pow(2).sum() / len(batch)
                loss.backward()
                step_loss += loss.detach().item()
                step_acc += pairwise_metrics(good.detach(), worse.detach())[0] * len(micro) / len(batch)
            if args.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
            optimizer.step()
            scheduler.step()
            losses.append(step_loss)
            accs.append(step_acc)
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}", acc=f"{np.mean(accs[-20:]):.3f}")
        bar.close()
        seconds = time.perf_counter() - t0
        train_time += seconds
        # the last evaluation runs in fp32: its rewards give the card's reference statistics
        held_c, held_r = evaluate(fast=bf16 and epoch < args.epochs - 1)
        acc, eval_loss = pairwise_metrics(held_c, held_r)
        record = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "train_acc": float(np.mean(accs)),
                  "heldout_acc": acc, "heldout_loss": eval_loss, "train_seconds": round(seconds, 2),
                  "train_pairs_per_s": round(len(train_pairs) / seconds, 2)}
        history.append(record)
        print(f"epoch {epoch + 1}: train loss {record['train_loss']:.4f} acc {record['train_acc']:.3f} | "
              f"held-out loss {eval_loss:.4f} acc {acc:.3f} | {record['train_pairs_per_s']} pairs/s")
    if not history:
        held_c, held_r = evaluate(fast=False)
    model.eval()

    # save: the directory the service loads
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    had_readme = (out / "README.md").exists()
    if args.lora:
        model.save_pretrained(str(out))  # type: ignore[union-attr,operator,call-overload]
        # point the adapter at the backbone *reference*, not this machine's path of it
        cfg_path = out / "adapter_config.json"
        adapter_cfg = json.loads(cfg_path.read_text())
        adapter_cfg["base_model_name_or_path"] = args.backbone
        adapter_cfg["modules_to_save"] = list(dict.fromkeys(adapter_cfg.get("modules_to_save") or []))
        cfg_path.write_text(json.dumps(adapter_cfg, indent=2, sort_keys=True) + "\n")
    else:
        for stale in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"):
            (out / stale).unlink(missing_ok=True)  # an adapter left here would be loaded instead
        model.save_pretrained(str(out))  # type: ignore[union-attr,operator,call-overload]
    tokenizer.save_pretrained(str(out))
    if not had_readme:
        (out / "README.md").unlink(missing_ok=True)  # peft's boilerplate model card

    held = torch.cat([held_c, held_r])
    final_acc, final_loss = pairwise_metrics(held_c, held_r)
    card: dict[str, Any] = {
        "format": CARD_FORMAT,
        "backbone": args.backbone,
        "adapter": bool(args.lora),
        "architecture": "decoder" if decoder else "encoder",
        "style": style,
        "max_length": args.max_length,
        "append_eos": args.append_eos,
        "pad_token_id": pad_id,
        "token_type_ids": types,
        "data": list(args.data),
        "split": {"seed": args.seed, "heldout_fraction": args.heldout_fraction,
                  "train_splits": list(args.train_splits), "eval_split": args.eval_split},
        "sizes": {"train_pairs": len(train_pairs), "eval_pairs": len(eval_pairs),
                  "skipped": dict(report.skipped), "response_truncated": train_cut + eval_cut,
                  "any_truncated": train_pcut + eval_pcut},
        "accuracy": {"heldout": None if math.isnan(final_acc) else final_acc,
                     "heldout_loss": None if math.isnan(final_loss) else final_loss,
                     "per_epoch": history},
        "reward_stats": _reward_stats(held),
        "config": asdict(args),
        "train_seconds": round(train_time, 2),
        "total_seconds": round(time.perf_counter() - started, 2),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__},
    }
    (out / CARD_NAME).write_text(json.dumps(card, indent=2) + "\n")
    return TrainResult(card, model, tokenizer, formatter, out)


def _reward_stats(rewards: Tensor) -> dict[str, float | int | None]:
    """Over every held-out response, chosen and rejected: the median is the service's global
    reference value r_ref."""
    if rewards.numel() == 0:
        return {"heldout_median": None, "heldout_mean": None, "heldout_std": None, "n": 0}
    values = rewards.double().numpy()
    return {"heldout_median": float(np.median(values)), "heldout_mean": float(values.mean()),
            "heldout_std": float(values.std()), "n": int(values.size)}


def print_summary(card: dict[str, Any], out: Path) -> None:
    acc = card["accuracy"]["heldout"]
    sizes = card["sizes"]
    stats = card["reward_stats"]
    print(
        f"\ntrain-rm done in {card['total_seconds']:.1f}s (training {card['train_seconds']:.1f}s)\n"
        f"  held-out accuracy: {'n/a' if acc is None else f'{acc:.4f}'} on {sizes['eval_pairs']} pairs "
        f"({card['split']['eval_split']}); trained on {sizes['train_pairs']} pairs\n"
        f"  skipped rows: {sizes['skipped'] or 'none'}; pairs with a cut response: {sizes['response_truncated']}\n"
        f"  held-out reward median {stats['heldout_median']}, mean {stats['heldout_mean']}, "
        f"std {stats['heldout_std']}\n"
        f"  saved to {out} ({'LoRA adapter on ' + card['backbone'] if card['adapter'] else 'full model'})"
    )


# -- CLI -----------------------------------------------------------------------------------
def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per dataclass field (``max_length`` → ``--max-length``), help from the field.

    Defaults stay with the dataclass (argparse leaves unset flags out of the namespace), so
    they are written in one place.
    """
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        meta = dict(f.metadata)
        help_text = meta.pop("help", "")
        required = meta.pop("required", False)
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc,operator]
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        args = typing.get_args(kind)
        base = next((a for a in args if a is not type(None)), kind) if args and type(None) in args else kind
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, **meta}
        if not required:
            help_text += f" (default: {default})"
        if base is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(base) is list:
            kw.update(nargs="+", action="extend", type=typing.get_args(base)[0])
        else:
            kw["type"] = base
        parser.add_argument(flag, help=help_text, required=required, **kw)


def args_from_namespace(ns: argparse.Namespace) -> TrainRMArgs:
    names = {f.name for f in fields(TrainRMArgs)}
    return TrainRMArgs(**{k: v for k, v in vars(ns).items() if k in names})


def main(args: argparse.Namespace | TrainRMArgs) -> int:
    """Run ``train-rm``; returns the exit status (2 on unusable data or arguments)."""
    targs = args if isinstance(args, TrainRMArgs) else args_from_namespace(args)
    try:
        result = train_rm(targs)
    except (DataError, ValueError, FileNotFoundError) as exc:
        print(f"train-rm: error: {exc}", file=sys.stderr)
        return 2
    print_summary(result.card, result.out)
    return 0


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``train-rm`` to a CLI; the parser's ``func`` default is :func:`main`."""
    parser = subparsers.add_parser(
        "train-rm", help="train a Bradley-Terry reward model (LoRA by default)",
        description=__doc__.split("\n\n")[0],
    )
    add_dataclass_arguments(parser, TrainRMArgs)
    parser.set_defaults(func=main)
    return parser


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m trainer.train_rm", description=__doc__.split("\n\n")[0])
    add_dataclass_arguments(_parser, TrainRMArgs)
    sys.exit(main(_parser.parse_args()))
