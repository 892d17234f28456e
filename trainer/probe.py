"""``logand probe-rm``: the linear-probe baseline for a reward model.

The backbone stays frozen; each (prompt, response) becomes the masked mean of its last hidden
states, formatted exactly as the reward model sees it; a linear reward ``r = w·e`` is fitted
with the Bradley–Terry loss on the embedding differences of the training pairs (L2-penalised,
full-batch L-BFGS).  Held-out pairwise accuracy on the same prompt split as ``train-rm`` says
how much of the preference signal is already linear in the frozen features, i.e. what the
fine-tuning adds.  Nothing is cached to disk.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from service.formatting import Encoded, Formatter
from service.modelpath import DEFAULT_BACKBONE, resolve_model_path
from trainer.data import SPLITS, DataError, length_batches, load_many, split_pairs
from trainer.train_rm import (
    _sample,
    bf16_default,
    collate,
    default_style,
    ensure_pad_token,
    is_decoder_config,
    pairwise_metrics,
    quiet_transformers,
    uses_token_types,
)


@torch.no_grad()
def embed(
    model: nn.Module, encodings: Sequence[Encoded], pad_id: int, batch_size: int = 32,
    bf16: bool = False, token_types: bool = True,
) -> Tensor:
    """Masked-mean last hidden states, (N, H) float32, in input order."""
    device = next(model.parameters()).device
    out: Tensor | None = None
    for batch in length_batches([len(e) for e in encodings], batch_size, seed=None):
        inputs = collate([encodings[i] for i in batch], pad_id, token_types, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            hidden = model(**inputs).last_hidden_state.float()  # (B, T, H)
        mask = inputs["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
        pooled = (hidden * mask).sum(1) / mask.sum(1)  # (B, H)
        if out is None:
            out = torch.empty(len(encodings), pooled.shape[-1])
        out[batch] = pooled.cpu()
    assert out is not None
    return out


def fit_linear_bt(diffs: Tensor, l2: float = 1e-3, max_iter: int = 200) -> Tensor:
    """w minimising mean(−log σ(w·d)) + l2·‖w‖² over embedding differences d (N, H)."""
    d = diffs.double()  # (N, H)
    w = torch.zeros(d.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = -F.logsigmoid(d @ w).mean() + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().float()


def probe_accuracy(
    data_sources: Sequence[str],
    backbone: str = DEFAULT_BACKBONE,
    max_length: int = 256,
    heldout_fraction: float = 0.2,
    seed: int = 0,
    train_splits: Sequence[str] = ("rm_train",),
    eval_split: str = "rm_heldout",
    l2: float = 1e-3,
    batch_size: int = 32,
    max_pairs: int | None = None,
    max_eval_pairs: int | None = None,
    bf16: bool | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Fit the probe and return its train and held-out pairwise accuracy and sizes."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    started = time.perf_counter()
    if threads:
        torch.set_num_threads(threads)
    bad = [s for s in [*train_splits, eval_split] if s not in SPLITS]
    if bad:
        raise ValueError(f"unknown split(s) {bad}; choose from {list(SPLITS)}")
    pairs, report = load_many(list(data_sources))
    splits = split_pairs(pairs, heldout_fraction, seed)
    train = _sample([p for s in dict.fromkeys(train_splits) for p in splits[s]], max_pairs, seed)
    held = _sample(splits[eval_split] if eval_split not in train_splits else [], max_eval_pairs, seed)
    if not train:
        raise DataError(f"no training pairs in splits {list(train_splits)} of {list(data_sources)}")

    path = resolve_model_path(backbone)
    config = AutoConfig.from_pretrained(path)
    decoder = is_decoder_config(config)
    tokenizer = AutoTokenizer.from_pretrained(path)
    style = default_style(decoder, tokenizer)
    pad_id = ensure_pad_token(tokenizer, decoder)
    formatter = Formatter(tokenizer, style, max_length)
    types = uses_token_types(tokenizer, style)
    with quiet_transformers():  # a reward-model dir as backbone has head weights AutoModel drops
        model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    use_bf16 = bf16_default(torch.device("cpu")) if bf16 is None else bf16

    def diffs(ps: list[Any]) -> Tensor:
        if not ps:
            return torch.empty(0, config.hidden_size)
        encs = [formatter.encode(p.prompt, r, allow_truncation=True) for p in ps for r in (p.chosen, p.rejected)]
        emb = embed(model, encs, pad_id, batch_size, use_bf16, types).view(len(ps), 2, -1)  # (N, 2, H)
        return emb[:, 0] - emb[:, 1]  # (N, H)

    d_train, d_held = diffs(train), diffs(held)
    # standardise by the training differences' scale so one l2 suits every backbone
    scale = d_train.std(0).clamp_min(1e-6)  # (H,)
    w = fit_linear_bt(d_train / scale, l2)

    def acc(d: Tensor) -> float | None:
        if d.shape[0] == 0:
            return None
        m = (d / scale) @ w  # (N,) r⁺ − r⁻
        return pairwise_metrics(m, torch.zeros_like(m))[0]

    return {
        "backbone": backbone, "style": style, "max_length": max_length,
        "train_acc": acc(d_train), "heldout_acc": acc(d_held),
        "train_pairs": len(train), "eval_pairs": len(held), "skipped": dict(report.skipped),
        "split": {"seed": seed, "heldout_fraction": heldout_fraction,
                  "train_splits": list(train_splits), "eval_split": eval_split},
        "l2": l2, "seconds": round(time.perf_counter() - started, 2),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--data", action="extend", nargs="+", required=True, help="preference sources (as for train-rm)")
    a("--backbone", default=DEFAULT_BACKBONE, help="frozen encoder: pkg:MODULE/dir, directory or hub name")
    a("--max-length", type=int, default=256, help="tokens per (prompt, response)")
    a("--heldout-fraction", type=float, default=0.2, help="held-out fraction of each half of the prompts")
    a("--seed", type=int, default=0, help="split seed")
    a("--train-splits", nargs="+", default=["rm_train"], choices=SPLITS, metavar="SPLIT",
      help="splits to fit on: " + ", ".join(SPLITS))
    a("--eval-split", default="rm_heldout", choices=SPLITS, metavar="SPLIT", help="split to report accuracy on")
    a("--l2", type=float, default=1e-3, help="L2 penalty on the (standardised) probe weights")
    a("--batch-size", type=int, default=32, help="sequences per forward")
    a("--max-pairs", type=int, default=None, help="cap on training pairs (a seeded sample)")
    a("--max-eval-pairs", type=int, default=None, help="cap on held-out pairs (a seeded sample)")
    a("--bf16", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast (default: where native)")
    a("--threads", type=int, default=None, help="torch CPU threads")


def main(ns: argparse.Namespace) -> int:
    try:
        result = probe_accuracy(
            ns.data, ns.backbone, ns.max_length, ns.heldout_fraction, ns.seed, ns.train_splits,
            ns.eval_split, ns.l2, ns.batch_size, ns.max_pairs, ns.max_eval_pairs, ns.bf16, ns.threads,
        )
    except (DataError, ValueError, FileNotFoundError) as exc:
        print(f"probe-rm: error: {exc}", file=sys.stderr)
        return 2
    held = result["heldout_acc"]
    print(
        f"linear probe on {result['backbone']}: train acc {result['train_acc']:.4f} on {result['train_pairs']} pairs, "
        f"held-out acc {'n/a' if held is None else f'{held:.4f}'} on {result['eval_pairs']} pairs "
        f"({result['seconds']:.1f}s)"
    )
    return 0


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``probe-rm`` to a CLI; the parser's ``func`` default is :func:`main`."""
    parser = subparsers.add_parser("probe-rm", help="linear-probe baseline on frozen backbone embeddings",
                                   description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    parser.set_defaults(func=main)
    return parser


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m trainer.probe", description=__doc__.split("\n\n")[0])
    add_arguments(_parser)
    sys.exit(main(_parser.parse_args()))
