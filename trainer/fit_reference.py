"""``logand fit-reference``: per-prompt reference quantiles predicted from the prompt.

For each training prompt, draw K samples from the SFT policy, score them through the running
service (raw rewards, over HTTP), record the per-prompt mean μ and standard deviation σ, and fit
two predictors on features of the prompt (appendix A.1 of the paper: a "mean model" and a "std
model").  The service then serves r_ref(x) = μ̂(x) + Φ⁻¹(q)·σ̂(x) as a ``quantile`` reference.

Features: L2-normalised hashed word 1- and 2-grams of the prompt transcript
(:class:`service.references.QuantilePredictor`), so the service predicts without a model
call; μ̂ is a ridge regression on them, σ̂ = softplus of a ridge regression fitted to
softplus⁻¹(σ), and — unless ``--no-predictive`` — the mean model's leave-one-out error e is
added in quadrature, σ̂ ← sqrt(σ̂² + e²): a new prompt's μ is only known to ±e, so the plain
μ̂ + sσ̂ of the paper covers far less than q of its samples when μ̂ is rough (as with a few
hundred prompts; see reports/reference/).  Samples go to a sample bank (:mod:`trainer.samples`) as they come, and are
scored in place: an interrupted run keeps what it collected and a rerun resumes where it
stopped; a service restart mid-run is waited out by the client's retries.
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


def loo_error(x: np.ndarray, y: np.ndarray, l2: float) -> float:
    """Root-mean-square leave-one-out error of :func:`ridge` (exact, from the hat matrix)."""
    gram = x @ x.T  # (N, N)
    hat = gram @ np.linalg.inv(gram + l2 * np.eye(len(y)))  # (N, N)
    yc = y - y.mean()
    residuals = (yc - hat @ yc) / (1.0 - np.diag(hat))
    return float(np.sqrt(np.mean(residuals**2)))


def inverse_softplus(y: np.ndarray) -> np.ndarray:
    y = np.maximum(y, 1e-4)
    return y + np.log(-np.expm1(-y))


def _artifact(dim: int, mw: np.ndarray, mb: float, sw: np.ndarray, sb: float, mean_error: float,
              fit: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"format": QuantilePredictor.FORMAT, "features": {"kind": "hashed_ngrams", "dim": dim, "ngrams": list(NGRAMS)},
            "mean": {"weights": [float(v) for v in mw], "bias": float(mb)},
            "std": {"weights": [float(v) for v in sw], "bias": float(sb), "mean_error": mean_error}, "fit": fit or {}}


def fit_predictor(prompts: Sequence[str], means: Sequence[float], stds: Sequence[float], l2: float = 1.0,
                  dim: int = FEATURE_DIM, fit: dict[str, Any] | None = None, predictive: bool = True) -> dict[str, Any]:
    """The artifact; ``predictive`` adds the mean model's leave-one-out error to σ (see
    :class:`service.references.QuantilePredictor`), so quantiles hold for prompts never seen."""
    x = features_matrix(prompts, dim)
    y = np.asarray(means, dtype=float)
    mw, mb = ridge(x, y, l2)
    sw, sb = ridge(x, inverse_softplus(np.asarray(stds, dtype=float)), l2)
    error = loo_error(x, y, l2) if predictive and len(y) > 2 else 0.0
    return _artifact(dim, mw, mb, sw, sb, error, dict(fit or {}, mean_loo_rmse=error))


def fit_from_bank(records: Sequence[dict[str, Any]], models: Sequence[str], l2: float,
                  fit: dict[str, Any], predictive: bool = True) -> dict[str, dict[str, Any]]:
    """One predictor artifact per model from a scored bank (prompts with ≥ 2 samples)."""
    use = [r for r in records if len(r["samples"]) >= 2 and all(m in r["rewards"] for m in models)]
    if not use:
        raise SystemExit("no prompt has two scored non-empty samples: nothing to fit")
    prompts = [r["prompt"] for r in use]
    out = {}
    for m in models:
        means = [float(np.mean(r["rewards"][m])) for r in use]
        stds = [float(np.std(r["rewards"][m], ddof=1)) for r in use]
        info = dict(fit, model=m, prompts=len(use), samples=sum(len(r["samples"]) for r in use),
                    mean_of_means=float(np.mean(means)), mean_of_stds=float(np.mean(stds)))
        out[m] = fit_predictor(prompts, means, stds, l2, fit=info, predictive=predictive)
    return out


def run(args: argparse.Namespace) -> dict[str, Path]:
    from trainer.sampling import Sampler
    from trainer.samples import fill_bank, read_bank, reward_client, sampling_args, score_bank, select_prompts

    started = time.perf_counter()
    prompts = select_prompts(args.data, args.split, args.prompts, args.heldout_fraction, args.split_seed)
    if not prompts:
        raise SystemExit(f"no prompts in split {args.split} of {args.data}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bank = Path(args.bank) if args.bank else out / "samples.jsonl"
    counts = fill_bank(bank, prompts, lambda: Sampler(args.policy, device=args.device, dtype=args.dtype), args.k,
                       sampling_args(args), policy=str(args.policy))
    # generous retries: a service restart mid-run is waited out, never a lost or duplicated prompt
    with reward_client(args) as client:
        models = args.models or client.models()["default_models"]
        score_bank(bank, client, models)
    wanted = set(prompts)
    records = [r for r in read_bank(bank) if r["prompt"] in wanted]
    fit = {"k": args.k, "split": args.split, "policy": str(args.policy), "bank": str(bank),
           "empty_samples": sum(r.get("empty", 0) for r in records), "prompt_truncated": counts["prompt_truncated"],
           "seconds": round(time.perf_counter() - started, 1)}
    written = {}
    for m, artifact in fit_from_bank(records, models, args.l2, fit, predictive=args.predictive).items():
        path = out / f"{m}.quantile.json"
        path.write_text(json.dumps(artifact) + "\n")
        written[m] = path
        info = artifact["fit"]
        print(f"{m}: {info['prompts']} prompts × K={args.k} → {path} (mean μ {info['mean_of_means']:.3f}, "
              f"mean σ {info['mean_of_stds']:.3f})")
    return written


def add_arguments(p: argparse.ArgumentParser) -> None:
    from trainer.samples import add_sampling_arguments, add_service_arguments

    add_sampling_arguments(p, k=64)
    a = p.add_argument
    add_service_arguments(p)
    a("--models", nargs="*", default=None, help="reward models to fit for (default: the service's defaults)")
    a("--split", default="align_train", help="prompt split to fit on")
    a("--bank", default=None, help="sample bank to use and extend (default: OUT/samples.jsonl)")
    a("--l2", type=float, default=1.0, help="ridge penalty of both predictors")
    a("--predictive", action=argparse.BooleanOptionalAction, default=True,
      help="add the mean model's leave-one-out error to σ: quantiles of the predictive distribution "
           "(--no-predictive: the paper's μ̂ + sσ̂ as is)")
    a("--out", default="runs/reference", help="output folder: <model>.quantile.json (and samples.jsonl)")


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
