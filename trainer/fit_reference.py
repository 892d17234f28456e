"""``logand fit-reference``: per-prompt reference quantiles predicted from the prompt.

For each training prompt, draw K samples from the SFT policy, score them through the running
service (raw rewards, over HTTP), record the per-prompt mean μ and standard deviation σ, and fit
two predictors on features of the prompt (appendix A.1 of the paper: a "mean model" and a "std
model").  The service then serves r_ref(x) = μ̂(x) + Φ⁻¹(q)·σ̂(x) as a ``quantile`` reference.

Features: L2-normalised hashed word 1- and 2-grams of the prompt transcript
(:class:`service.references.QuantilePredictor`), so the service predicts without a model
call; μ̂ is a ridge regression on them, σ̂ = softplus of a ridge regression fitted to
softplus⁻¹(σ).  Samples and their rewards are appended to ``samples.jsonl`` as they come, so an
interrupted run keeps what it collected.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from service.references import QuantilePredictor, hashed_ngram_features

FEATURE_DIM = 4096
NGRAMS = (1, 2)


def features_matrix(prompts: Sequence[str], dim: int = FEATURE_DIM) -> np.ndarray:
    x = np.zeros((len(prompts), dim))  # (N, D)
    for i, p in enumerate(prompts):
        for j, v in hashed_ngram_features(p, dim, NGRAMS).items():
            x[i, j] = v
    return x


def ridge(x: np.ndarray, y: np.ndarray, l2: float) -> tuple[np.ndarray, float]:
    """Weights (D,) and bias of min |x·w + b − y|² + l2·|w|², solved in the dual (N ≪ D)."""
    mean = float(y.mean())
    gram = x @ x.T  # (N, N)
    alpha = np.linalg.solve(gram + l2 * np.eye(len(y)), y - mean)  # (N,)
    return x.T @ alpha, mean


def inverse_softplus(y: np.ndarray) -> np.ndarray:
    y = np.maximum(y, 1e-4)
    return y + np.log(-np.expm1(-y))


def _artifact(dim: int, mw: np.ndarray, mb: float, sw: np.ndarray, sb: float, fit: dict[str, Any] | None = None
              ) -> dict[str, Any]:
    return {"format": QuantilePredictor.FORMAT, "features": {"kind": "hashed_ngrams", "dim": dim, "ngrams": list(NGRAMS)},
            "mean": {"weights": [float(v) for v in mw], "bias": float(mb)},
            "std": {"weights": [float(v) for v in sw], "bias": float(sb)}, "fit": fit or {}}


def fit_predictor(prompts: Sequence[str], means: Sequence[float], stds: Sequence[float], l2: float = 1.0,
                  dim: int = FEATURE_DIM, fit: dict[str, Any] | None = None) -> dict[str, Any]:
    x = features_matrix(prompts, dim)
    mw, mb = ridge(x, np.asarray(means, dtype=float), l2)
    sw, sb = ridge(x, inverse_softplus(np.asarray(stds, dtype=float)), l2)
    return _artifact(dim, mw, mb, sw, sb, fit)


def run(args: argparse.Namespace) -> dict[str, Path]:
    from clients.client import RewardClient
    from trainer.data import load_many, split_pairs
    from trainer.sampling import Sampler, SamplingArgs

    started = time.perf_counter()
    pairs, _ = load_many(args.data)
    prompts = list(dict.fromkeys(p.prompt for p in split_pairs(pairs, args.heldout_fraction, args.seed)[args.split]))
    prompts = prompts[: args.prompts] if args.prompts else prompts
    if not prompts:
        raise SystemExit(f"no prompts in split {args.split} of {args.data}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sampler = Sampler(args.policy)
    sampling = SamplingArgs(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                            batch_size=args.batch_size, seed=args.seed)
    stats: dict[str, dict[str, list[float]]] = {}
    kept: list[str] = []
    skipped_empty = 0
    with RewardClient(args.service, api_key=args.api_key) as client, (out / "samples.jsonl").open("a") as log:
        models = args.models or client.models()["default_models"]
        for start in range(0, len(prompts), args.prompts_per_round):
            group = prompts[start : start + args.prompts_per_round]
            samples, _ = sampler.sample(group, args.k, sampling, progress=True)
            for prompt, draws in zip(group, samples):
                texts = [s.text for s in draws if s.text]
                skipped_empty += len(draws) - len(texts)
                if len(texts) < 2:
                    continue
                # raw rewards come back whatever the aggregate, so the default method suits any model count
                results = client.score([(prompt, t) for t in texts], models=models, allow_truncation=True)
                rewards = {m: [r.rewards[m] for r in results] for m in models}
                log.write(json.dumps({"prompt": prompt, "samples": texts, "rewards": rewards}) + "\n")
                log.flush()
                kept.append(prompt)
                for m in models:
                    entry = stats.setdefault(m, {"mean": [], "std": []})
                    entry["mean"].append(float(np.mean(rewards[m])))
                    entry["std"].append(float(np.std(rewards[m], ddof=1)))
    written = {}
    for m, entry in stats.items():
        fit = {"model": m, "k": args.k, "prompts": len(kept), "split": args.split, "policy": str(args.policy),
               "skipped_empty_samples": skipped_empty, "seconds": round(time.perf_counter() - started, 1),
               "mean_of_means": float(np.mean(entry["mean"])), "mean_of_stds": float(np.mean(entry["std"]))}
        artifact = fit_predictor(kept, entry["mean"], entry["std"], args.l2, fit=fit)
        path = out / f"{m}.quantile.json"
        path.write_text(json.dumps(artifact) + "\n")
        written[m] = path
        print(f"{m}: {len(kept)} prompts × K={args.k} → {path} (mean μ {fit['mean_of_means']:.3f}, "
              f"mean σ {fit['mean_of_stds']:.3f})")
    if not written:
        raise SystemExit("no prompt had two non-empty samples: nothing to fit")
    return written


def add_arguments(p: argparse.ArgumentParser) -> None:
    a = p.add_argument
    a("--policy", required=True, help="causal-LM directory or pkg:/hub reference (the SFT policy)")
    a("--data", action="append", required=True, help="preference file(s) whose prompts are used")
    a("--service", default="http://127.0.0.1:8000", help="URL of the running logand service")
    a("--api-key", default=None, help="service API key")
    a("--models", nargs="*", default=None, help="reward models to fit for (default: the service's defaults)")
    a("--split", default="align_train", help="prompt split to fit on")
    a("--heldout-fraction", type=float, default=0.2)
    a("--prompts", type=int, default=None, help="use at most this many prompts")
    a("--prompts-per-round", type=int, default=8, help="prompts sampled per generate round")
    a("--k", type=int, default=64, help="samples per prompt (the paper: 64)")
    a("--temperature", type=float, default=1.0)
    a("--top-p", type=float, default=1.0)
    a("--max-new-tokens", type=int, default=128)
    a("--batch-size", type=int, default=16)
    a("--seed", type=int, default=0)
    a("--l2", type=float, default=1.0, help="ridge penalty of both predictors")
    a("--out", default="runs/reference", help="output folder: <model>.quantile.json and samples.jsonl")


def register(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("fit-reference", help="fit per-prompt reference-quantile predictors",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=lambda ns: (run(ns), 0)[1])
    return p


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m trainer.fit_reference", description=__doc__)
    add_arguments(parser)
    run(parser.parse_args())
