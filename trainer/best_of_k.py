"""Best-of-k: draw k responses from the policy, keep the one with the highest utility.

``logand best-of-k`` samples k responses per prompt, scores them through the service with the
chosen method (``log_sigmoid_sum`` by default: "good in all properties"), and writes one JSONL
line per prompt with every sample, its utility and raw rewards, and the index of the best —
as each prompt finishes, so an interrupted run keeps what it did and a rerun skips it.

The estimator used by ``logand experiment best-of-k`` lives here too:
:func:`expected_best_of_k` gives, exactly, the expected value of any per-sample outcome for the
best of k samples drawn without replacement from n, so one pass of n samples per prompt
measures every k ≤ n.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np


def kl_best_of_k(k: int) -> float:
    """KL(best-of-k ‖ policy) = log k − (k − 1)/k (the analytic bound the paper plots against)."""
    return math.log(k) - (k - 1) / k


def selection_weights(n: int, k: int) -> np.ndarray:
    """P(the sample at ascending rank j, 0-based, is the best of a uniform k-subset of n) = C(j, k−1)/C(n, k)."""
    if not 1 <= k <= n:
        raise ValueError(f"need 1 ≤ k ≤ n, got k={k}, n={n}")
    total = math.comb(n, k)
    return np.array([math.comb(j, k - 1) / total for j in range(n)])


def ranking(utilities: np.ndarray) -> np.ndarray:
    """Indices from worst to best; ties go to the lower index (as in :func:`best_index`)."""
    n = len(utilities)
    return np.lexsort((-np.arange(n), utilities))  # primary key last: utility, then higher index = worse


def best_index(utilities: Sequence[float]) -> int:
    """The argmax, the lowest index winning ties."""
    return int(np.argmax(np.asarray(utilities)))


def expected_best_of_k(utilities: np.ndarray, outcomes: np.ndarray, ks: Sequence[int]) -> np.ndarray:
    """E[outcome of the best of k] for each k, k samples drawn without replacement from the n given.

    utilities (n,), outcomes (n,) or (n, d) → (len(ks),) or (len(ks), d)."""
    order = ranking(np.asarray(utilities, dtype=float))
    sorted_outcomes = np.asarray(outcomes, dtype=float)[order]
    return np.stack([selection_weights(len(order), k) @ sorted_outcomes for k in ks])


# -- logand best-of-k ----------------------------------------------------------------------
def run(args: argparse.Namespace) -> Path:
    from tqdm.auto import tqdm

    from trainer.sampling import Sampler
    from trainer.samples import repair_tail, read_bank, reward_client, sampling_args, select_prompts

    started = time.perf_counter()
    prompts = list(args.prompt or []) or select_prompts(args.data or [], args.split, args.prompts,
                                                        args.heldout_fraction, args.split_seed)
    if not prompts:
        raise SystemExit("no prompts: give --prompt TEXT or --data FILE")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {r["prompt"] for r in read_bank(out)}  # tolerates a torn last line
    repair_tail(out)
    todo = [p for p in prompts if p not in done]
    if not todo:
        print(f"{out}: all {len(prompts)} prompts already done")
        return out
    sampler = Sampler(args.policy, device=args.device, dtype=args.dtype)
    written = 0
    with reward_client(args) as client, out.open("a") as log:
        bar = tqdm(total=len(todo), desc=f"best-of-{args.k}", unit="prompt")
        for i, samples, _ in sampler.iter_samples(todo, args.k, sampling_args(args), progress=False):
            texts = [s.text for s in samples if s.text]
            if not texts:
                bar.update(1)
                continue
            results = client.score([(todo[i], t) for t in texts], models=args.models, method=args.method,
                                   allow_truncation=True)
            utilities = [r.utility for r in results]
            best = best_index(utilities)
            log.write(json.dumps({
                "prompt": todo[i], "k": args.k, "method": args.method or "service default", "best": best,
                "best_text": texts[best], "empty": len(samples) - len(texts),
                "samples": [{"text": t, "utility": r.utility, "rewards": r.rewards, "references": r.references}
                            for t, r in zip(texts, results)],
            }) + "\n")
            log.flush()
            written += 1
            bar.update(1)
        bar.close()
    print(f"{out}: best of {args.k} for {written} prompts in {time.perf_counter() - started:.1f} s")
    return out


def register(subparsers: Any) -> argparse.ArgumentParser:
    from trainer.samples import add_sampling_arguments, add_service_arguments

    p = subparsers.add_parser("best-of-k", help="best of k policy samples per prompt, ranked by the service",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sampling_arguments(p, k=16, data_required=False)  # prompts may come from --prompt instead
    p.add_argument("--prompt", action="append", help="a prompt (HH transcript or plain question); repeatable")
    p.add_argument("--split", default="align_heldout", help="prompt split of --data")
    add_service_arguments(p)
    p.add_argument("--models", nargs="*", default=None, help="models to rank by (default: the service's defaults)")
    p.add_argument("--method", default=None, help="aggregation (default: the service's, log_sigmoid_sum)")
    p.add_argument("--out", default="runs/best-of-k.jsonl", help="JSONL, one line per prompt; extended on rerun")
    p.set_defaults(func=lambda ns: (run(ns), 0)[1])
    return p
