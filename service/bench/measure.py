"""In-process measurements: the matmul limit, texts, models, backend throughput, agreement."""

from __future__ import annotations

import gzip
import json
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..backends import Backend
from ..engine import BatchPolicy, plan_batch
from ..formatting import Encoded, parse_hh, render_hh

Pair = tuple[str, str, str]  # (prompt transcript, chosen response, rejected response)


# -- the limit -------------------------------------------------------------------------------
def matmul_flops(dtype: str, device: str, n: int = 2048, seconds: float = 1.0) -> float:
    """Measured FLOP/s of an n×n @ n×n matmul (best of a few timed rounds)."""
    import torch

    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    dev = torch.device(device)
    a = torch.randn(n, n, device=dev).to(dt)
    b = torch.randn(n, n, device=dev).to(dt)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    for _ in range(2):
        a @ b
    sync()
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        reps = 1
        t0 = time.perf_counter()
        a @ b
        sync()
        dt_s = time.perf_counter() - t0
        if dt_s < 0.05:  # too short to time alone: repeat within one timing
            reps = max(1, int(0.05 / max(dt_s, 1e-6)))
            t0 = time.perf_counter()
            for _ in range(reps):
                a @ b
            sync()
            dt_s = time.perf_counter() - t0
        best = max(best, 2.0 * n**3 * reps / dt_s)
    return best


# -- texts -----------------------------------------------------------------------------------
def load_pairs(data_dir: Path, n: int, seed: int = 0) -> list[Pair]:
    """``n`` HH pairs (prompt, chosen, rejected) from every ``*.jsonl.gz`` in ``data_dir``, shuffled."""
    files = sorted(data_dir.glob("*.jsonl.gz"))
    if not files:
        raise FileNotFoundError(f"no HH-RLHF *.jsonl.gz files in {data_dir}")
    pairs: list[Pair] = []
    for f in files:
        with gzip.open(f, "rt", encoding="utf-8") as fh:
            for line in fh:
                row = json.loads(line)
                c, r = parse_hh(row["chosen"]), parse_hh(row["rejected"])
                if not c or not r or c[-1]["role"] != "assistant" or r[-1]["role"] != "assistant":
                    continue
                if c[:-1] != r[:-1] or not c[-1]["content"] or not r[-1]["content"]:
                    continue
                if c[-1]["content"] == r[-1]["content"]:
                    continue
                pairs.append((render_hh(c[:-1]), c[-1]["content"], r[-1]["content"]))
    random.Random(seed).shuffle(pairs)
    return pairs[:n]


def items_of(pairs: Sequence[Pair]) -> list[tuple[str, str]]:
    """Chosen then rejected, pair by pair: item 2i is chosen, 2i + 1 rejected."""
    return [it for p, c, r in pairs for it in ((p, c), (p, r))]


def best_of_k_items(pairs: Sequence[Pair], k: int, formatter: Any) -> list[tuple[str, str]]:
    """One prompt (the pool's median prompt length) with ``k`` responses taken from other pairs."""
    by_len = sorted(pairs, key=lambda p: len(formatter.encode(p[0], "x", allow_truncation=True)))
    prompt = by_len[len(by_len) // 2][0]
    responses = [x for p in pairs for x in (p[1], p[2])][:k]
    return [(prompt, r) for r in responses]


# -- models ----------------------------------------------------------------------------------
def non_embedding_params(model: Any) -> int:
    """Parameters outside embedding tables (the ones that cost 2 FLOPs per token each)."""
    import torch

    embedded = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in embedded)


def build_decoder_rm(policy_dir: Path, out: Path, seed: int = 0) -> Path:
    """A one-label sequence classifier on a causal LM (randomly initialised scalar head)."""
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(policy_dir)
    model = AutoModelForSequenceClassification.from_pretrained(policy_dir, num_labels=1, dtype=torch.float32)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


# -- backend throughput ----------------------------------------------------------------------
def policies(on_gpu: bool) -> dict[str, BatchPolicy]:
    """Batching policies tried in-process; the best one is 'the backend at its best batching'."""
    if on_gpu:
        return {f"bs{b}": BatchPolicy(max_batch_size=b, max_batch_tokens=65536, min_fill=0.0) for b in (1, 16, 64, 256)}
    out = {"bs1": BatchPolicy(max_batch_size=1)}
    for fill in (0.97, 0.9, 0.8):
        out[f"fill{fill:g}"] = BatchPolicy(min_fill=fill)
    out["fill0-bs8"] = BatchPolicy(min_fill=0.0, max_batch_size=8)
    out["fill0-bs64"] = BatchPolicy(min_fill=0.0)
    return out


@dataclass
class Throughput:
    policy: str
    items: int
    tokens: int
    padded: int
    batches: int
    seconds: float
    scores: list[float] = field(repr=False, default_factory=list)

    @property
    def items_per_s(self) -> float:
        return self.items / self.seconds

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    def summary(self, flops_per_token: float, limit: float | None) -> dict[str, Any]:
        eff = flops_per_token * self.tokens_per_s
        return {
            "policy": self.policy, "items": self.items, "batches": self.batches, "seconds": round(self.seconds, 3),
            "items_per_s": round(self.items_per_s, 2), "tokens_per_s": round(self.tokens_per_s, 1),
            "fill": round(self.tokens / self.padded, 3), "effective_flops": eff,
            "fraction_of_matmul": round(eff / limit, 3) if limit else None,
        }


def run_batched(backend: Backend, encoded: Sequence[Encoded], policy: BatchPolicy, name: str = "") -> Throughput:
    """Score everything as the engine would with all of it queued: ``plan_batch`` over the queue."""
    pending = list(range(len(encoded)))
    scores = [0.0] * len(encoded)
    batches = padded = 0
    elapsed = 0.0
    while pending:
        chosen = plan_batch([len(encoded[i]) for i in pending], policy)
        idx = [pending[c] for c in chosen]
        batch = [encoded[i] for i in idx]
        t0 = time.perf_counter()
        out = backend.score(batch)
        elapsed += time.perf_counter() - t0
        for i, s in zip(idx, out):
            scores[i] = s
        batches += 1
        padded += max(len(e) for e in batch) * len(batch)
        taken = set(chosen)
        pending = [p for k, p in enumerate(pending) if k not in taken]
    return Throughput(name, len(encoded), sum(len(e) for e in encoded), padded, batches, elapsed, scores)


def forward_time(backend: Backend, item: Encoded, repeats: int) -> float:
    """Median seconds of one forward of one item."""
    backend.score([item])
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        backend.score([item])
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# -- agreement -------------------------------------------------------------------------------
def pairwise_agreement(reference: Sequence[float], scores: Sequence[float]) -> dict[str, Any]:
    """Pairwise accuracy (item 2i chosen over 2i + 1) of both score lists, and how they differ.

    ``ok``: the accuracies are within 0.5 percentage point of each other.
    """
    n = len(reference) // 2
    if n == 0 or len(scores) != len(reference):
        raise ValueError("need the same even number (≥ 2) of reference and candidate scores")
    d_ref = [reference[2 * i] - reference[2 * i + 1] for i in range(n)]
    d = [scores[2 * i] - scores[2 * i + 1] for i in range(n)]
    acc_ref = sum(x > 0 for x in d_ref) / n
    acc = sum(x > 0 for x in d) / n
    flips = sum((a > 0) != (b > 0) for a, b in zip(d_ref, d)) / n
    delta = 100.0 * abs(acc - acc_ref)
    return {
        "pairs": n, "accuracy_reference": round(acc_ref, 4), "accuracy": round(acc, 4),
        "delta_points": round(delta, 3), "order_flips": round(flips, 4),
        "max_abs_diff": round(max(abs(a - b) for a, b in zip(reference, scores)), 5),
        "ok": delta <= 0.5,
    }
