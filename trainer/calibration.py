"""``logand calibrate-reference``: does the predicted q-quantile cover q of fresh SFT samples?

For every held-out prompt (never used in the fit) and q ∈ {0.5, 0.75, 0.85, 0.95}:

* coverage = fraction of the prompt's fresh SFT samples whose reward is below the reference;
* per-prompt error = |coverage − q|.

Three references side by side:

``predicted``     μ̂(x) + Φ⁻¹(q)·σ̂(x) from the fitted artifact (what the service serves; σ̂
                  includes the mean model's error when the artifact was fitted predictive);
``plain``         the paper's μ̂ + Φ⁻¹(q)·σ̂ with σ̂ the std model alone;
``constant``      the global q-quantile of all SFT rewards on the training prompts (one number);
``normal oracle`` μ(x) + Φ⁻¹(q)·σ(x) with the held-out prompt's own sample mean and std — the
                  best any μ/σ predictor could do; its gap to q is the cost of the normal
                  assumption alone, the rest of the predicted row's gap is prediction error.

The target (issue 4): average coverage within ±0.05 of q, and a smaller per-prompt error than
the constant.  Paired bootstrap intervals (over prompts) on the error difference say whether
the predicted reference beats the constant beyond noise.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from statistics import NormalDist
from typing import Any, Sequence

import numpy as np

LEVELS = (0.5, 0.75, 0.85, 0.95)
TOLERANCE = 0.05
BOOTSTRAP = 2000


def bootstrap_mean_ci(values: np.ndarray, rng: np.random.Generator, n: int = BOOTSTRAP) -> tuple[float, float]:
    """95% percentile interval of the mean of ``values`` (N,) over resampled rows."""
    idx = rng.integers(0, len(values), size=(n, len(values)))  # (n, N)
    means = values[idx].mean(axis=1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def calibrate(heldout: Sequence[dict[str, Any]], train: Sequence[dict[str, Any]], predictor: Any, model: str,
              levels: Sequence[float] = LEVELS, seed: int = 0) -> dict[str, Any]:
    """Coverage figures of one model's reference on held-out banks (records with rewards)."""
    rng = np.random.default_rng(seed)
    held = [r for r in heldout if len(r["rewards"].get(model, [])) >= 2]
    scored = [r["rewards"][model] for r in train if r["rewards"].get(model)]
    pooled = np.concatenate(scored) if scored else np.zeros(0)
    if not held or not len(pooled):
        raise SystemExit(f"{model}: no scored samples in the banks")
    rewards = [np.asarray(r["rewards"][model]) for r in held]
    predicted = np.array([predictor.predict(r["prompt"]) for r in held])  # (P, 2): μ̂, σ̂
    truth = np.array([(x.mean(), x.std(ddof=1)) for x in rewards])  # (P, 2): μ, σ of the fresh samples
    rows = []
    for q in levels:
        s = NormalDist().inv_cdf(q)
        constant = float(np.quantile(pooled, q))
        plain_sd = np.sqrt(np.maximum(predicted[:, 1] ** 2 - getattr(predictor, "mean_error", 0.0) ** 2, 0.0))
        thresholds = {"predicted": predicted[:, 0] + s * predicted[:, 1],
                      "plain": predicted[:, 0] + s * plain_sd,
                      "constant": np.full(len(held), constant),
                      "normal_oracle": truth[:, 0] + s * truth[:, 1]}
        row: dict[str, Any] = {"q": q, "constant_value": constant}
        errors = {}
        for name, th in thresholds.items():
            cov = np.array([(x < t).mean() for x, t in zip(rewards, th)])  # (P,)
            errors[name] = np.abs(cov - q)
            row[name] = {"coverage": float(cov.mean()), "coverage_ci": bootstrap_mean_ci(cov, rng),
                         "abs_error": float(errors[name].mean())}
        diff = errors["predicted"] - errors["constant"]
        row["abs_error_diff"] = {"mean": float(diff.mean()), "ci": bootstrap_mean_ci(diff, rng)}
        rows.append(row)
    mean_corr, std_corr = _corr(predicted[:, 0], truth[:, 0]), _corr(predicted[:, 1], truth[:, 1])
    return {"model": model, "prompts": len(held), "samples": int(sum(len(x) for x in rewards)),
            "train_samples": int(len(pooled)), "levels": rows,
            "mean_prediction": {"corr": mean_corr, "rmse": float(np.sqrt(((predicted[:, 0] - truth[:, 0]) ** 2).mean())),
                                "rmse_of_constant": float(np.sqrt(((pooled.mean() - truth[:, 0]) ** 2).mean()))},
            "std_prediction": {"corr": std_corr, "mean_predicted": float(predicted[:, 1].mean()),
                               "mean_true": float(truth[:, 1].mean())},
            "scatter": {"mu_hat": predicted[:, 0].tolist(), "mu": truth[:, 0].tolist()}}


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation; NaN where either side is constant (a predictor that ignores x)."""
    if len(a) < 3 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def verdict(result: dict[str, Any]) -> str:
    within = [abs(r["predicted"]["coverage"] - r["q"]) <= TOLERANCE for r in result["levels"]]
    better = [r["abs_error_diff"]["ci"][1] < 0 for r in result["levels"]]
    worse = [r["abs_error_diff"]["ci"][0] > 0 for r in result["levels"]]
    parts = [f"average coverage within ±{TOLERANCE} of q at {sum(within)} of {len(within)} levels",
             f"per-prompt error smaller than the constant's beyond the 95% interval at {sum(better)} of "
             f"{len(better)} levels" + (f", larger at {sum(worse)}" if any(worse) else "")]
    met = all(within) and all(better)
    return ("target met: " if met else "target not met: ") + "; ".join(parts) + "."


def write_report(results: list[dict[str, Any]], fits: dict[str, dict[str, Any]], out: Path,
                 command: str) -> dict[str, Path]:
    from trainer.plots import pyplot, save

    out.mkdir(parents=True, exist_ok=True)
    (out / "calibration.json").write_text(json.dumps({"results": results, "fits": fits}, indent=1) + "\n")
    plt = pyplot()
    fig, axes = plt.subplots(len(results), 3, figsize=(13, 3.6 * len(results)), squeeze=False)
    styles = {"predicted": ("C0", "o", "served: μ̂ + s·√(σ̂² + e²)"), "plain": ("C3", "v", "plain μ̂ + sσ̂ (paper)"),
              "constant": ("C1", "s", "constant (global quantile)"),
              "normal_oracle": ("C2", "^", "normal oracle (true μ, σ)")}
    for row, res in zip(axes, results):
        qs = [r["q"] for r in res["levels"]]
        ax = row[0]
        ax.plot([0.45, 1], [0.45, 1], color="grey", lw=1, ls="--", label="perfect")
        ax.fill_between([0.45, 1], [0.45 - TOLERANCE, 1 - TOLERANCE], [0.45 + TOLERANCE, 1 + TOLERANCE],
                        color="grey", alpha=0.12, label=f"±{TOLERANCE}")
        for name, (color, marker, label) in styles.items():
            cov = [r[name]["coverage"] for r in res["levels"]]
            lo = [r[name]["coverage"] - r[name]["coverage_ci"][0] for r in res["levels"]]
            hi = [r[name]["coverage_ci"][1] - r[name]["coverage"] for r in res["levels"]]
            ax.errorbar(qs, cov, yerr=[lo, hi], color=color, marker=marker, capsize=3, label=label)
        ax.set(title=f"{res['model']}: average coverage", xlabel="target quantile q",
               ylabel="fraction of fresh samples below r_ref")
        ax.legend(fontsize=8)
        ax = row[1]
        width = 0.02
        for j, (name, (color, _, label)) in enumerate(styles.items()):
            ax.bar([q + (j - 1.5) * width for q in qs], [r[name]["abs_error"] for r in res["levels"]], width,
                   color=color, label=label)
        ax.set(title=f"{res['model']}: per-prompt |coverage − q|", xlabel="target quantile q",
               ylabel="mean over held-out prompts")
        ax.legend(fontsize=8)
        ax = row[2]
        sc = res["scatter"]
        ax.scatter(sc["mu"], sc["mu_hat"], s=12, alpha=0.7)
        lims = [min(sc["mu"] + sc["mu_hat"]), max(sc["mu"] + sc["mu_hat"])]
        ax.plot(lims, lims, color="grey", lw=1, ls="--")
        ax.set(title=f"{res['model']}: per-prompt mean reward (r = {res['mean_prediction']['corr']:.2f})",
               xlabel="μ of fresh SFT samples", ylabel="predicted μ̂")
    png = save(fig, out / "calibration.png")
    lines = ["# Reference-quantile calibration", "",
             "How often fresh SFT samples of held-out prompts (never used in the fit) fall below the",
             "reference the service serves, against a constant reference (the global q-quantile of the",
             "training prompts' SFT rewards).  Target: average coverage within ±0.05 of q and a smaller",
             "per-prompt |coverage − q| than the constant.  Intervals: 95% bootstrap over prompts.", "",
             f"Command: `{command}`", "", "![calibration](calibration.png)", ""]
    for res in results:
        fit = fits.get(res["model"], {})
        lines += [f"## {res['model']}", "",
                  f"Fit: {fit.get('prompts', '?')} training prompts × K = {fit.get('k', '?')} "
                  f"({fit.get('samples', '?')} samples), policy `{fit.get('policy', '?')}`.  "
                  f"Held out: {res['prompts']} prompts, {res['samples']} fresh samples.", "",
                  "| q | served coverage | plain coverage | constant coverage | oracle coverage | served err "
                  "| plain err | constant err | oracle err | err diff (served − const) [95% CI] |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in res["levels"]:
            d = r["abs_error_diff"]
            lines.append(
                f"| {r['q']} | {r['predicted']['coverage']:.3f} | {r['plain']['coverage']:.3f} | "
                f"{r['constant']['coverage']:.3f} | {r['normal_oracle']['coverage']:.3f} | "
                f"{r['predicted']['abs_error']:.3f} | {r['plain']['abs_error']:.3f} | "
                f"{r['constant']['abs_error']:.3f} | {r['normal_oracle']['abs_error']:.3f} | "
                f"{d['mean']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}] |")
        mp, sp = res["mean_prediction"], res["std_prediction"]
        lines += ["", f"Mean model: corr(μ̂, μ) = {mp['corr']:.3f}, RMSE {mp['rmse']:.3f} "
                      f"(its leave-one-out estimate on the training prompts, e: {fit.get('mean_loo_rmse', 0.0):.3f}) "
                      f"(a constant μ: {mp['rmse_of_constant']:.3f}).  Std model: corr(σ̂, σ) = {sp['corr']:.3f}, "
                      f"mean σ̂ {sp['mean_predicted']:.3f} vs mean σ {sp['mean_true']:.3f}.", "",
                  f"**{verdict(res)}**", ""]
    md = out / "calibration.md"
    md.write_text("\n".join(lines))
    return {"json": out / "calibration.json", "png": png, "md": md}


def run(args: argparse.Namespace) -> dict[str, Path]:
    from service.references import QuantilePredictor
    from trainer.samples import read_bank

    started = time.perf_counter()
    heldout, train = read_bank(args.heldout_bank), read_bank(args.train_bank)
    results, fits = [], {}
    for m in args.models:
        path = Path(args.references) / f"{m}.quantile.json"
        predictor = QuantilePredictor.load(path)
        fits[m] = json.loads(path.read_text()).get("fit", {})
        results.append(calibrate(heldout, train, predictor, m, seed=args.seed))
        print(f"{m}: {verdict(results[-1])}")
    command = args.command_line or "logand calibrate-reference " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(v) if isinstance(v, list) else v}"
        for k, v in vars(args).items() if k in ("references", "train_bank", "heldout_bank", "models", "out"))
    written = write_report(results, fits, Path(args.out), command)
    print(f"wrote {written['md']} and {written['png']} in {time.perf_counter() - started:.1f} s")
    return written


def register(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("calibrate-reference", help="coverage of fitted reference quantiles on held-out prompts",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--references", required=True, help="folder with <model>.quantile.json (from fit-reference)")
    p.add_argument("--train-bank", required=True, help="scored bank of the training prompts (the fit's)")
    p.add_argument("--heldout-bank", required=True, help="scored bank of held-out prompts (fresh samples)")
    p.add_argument("--models", nargs="+", required=True)
    p.add_argument("--out", default="reports/reference")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--command-line", default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=lambda ns: (run(ns), 0)[1])
    return p
