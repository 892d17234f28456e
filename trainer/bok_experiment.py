"""``logand experiment best-of-k``: the paper's AND-aggregation experiment (§5.3, Figures 6a, 7).

On held-out alignment prompts (never used to train the reward models or fit references):

1. draw ``max_k`` SFT samples per prompt once (a sample bank, :mod:`trainer.samples`);
2. score every sample through the service: the two reward models being aggregated and the two
   evaluator models that judge (raw rewards);
3. rank each prompt's samples by
   * ``transformed sum``: Σ log σ(r − r_ref) with r_ref = the prompt's SFT median reward per
     property (paper §5.3), and
   * ``weighted raw sum``: w·r_help + (1 − w)·r_harm for w = 0.1 … 0.9,
   both computed with :func:`service.utility.aggregate`, the service's own code;
4. judge: a sample *wins* if its evaluator helpfulness beats the prompt's SFT median AND its
   evaluator harmlessness beats the prompt's SFT median;
5. for every k ≤ max_k, the exact expected AND-win rate of best-of-k over uniform k-subsets
   (:func:`trainer.best_of_k.expected_best_of_k`), averaged over prompts, against
   KL = log k − (k − 1)/k;
6. 95% bootstrap intervals over prompts, and a paired bootstrap of the difference
   (transformed sum − best weighted sum), the best w re-chosen inside every replicate — so the
   baseline keeps its advantage of being tuned on the test prompts.

Outputs in ``--out``: ``results.csv``, ``results.json``, ``report.md``, ``win_rate_vs_kl.png``
(Figure 6a) and ``chosen_joint.png`` (Figure 7: evaluator rewards of the chosen samples).
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from service.utility import aggregate
from trainer.best_of_k import expected_best_of_k, kl_best_of_k, ranking

WEIGHTS = tuple(round(0.1 * i, 1) for i in range(1, 10))
BOOTSTRAP = 2000
TRANSFORMED = "transformed sum"


def default_ks(max_k: int) -> list[int]:
    ks = [k for k in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 191, 256) if k <= max_k]
    return ks if ks[-1] == max_k else ks + [max_k]


def method_utilities(rewards: dict[str, np.ndarray], help_m: str, harm_m: str) -> dict[str, np.ndarray]:
    """Utility of each sample (n,) under every ranking method, for one prompt."""
    refs = {m: float(np.median(rewards[m])) for m in (help_m, harm_m)}
    n = len(rewards[help_m])
    rows = [{help_m: float(rewards[help_m][j]), harm_m: float(rewards[harm_m][j])} for j in range(n)]
    out = {TRANSFORMED: np.array([aggregate(r, refs, "log_sigmoid_sum").utility for r in rows])}
    for w in WEIGHTS:
        out[f"weighted w={w}"] = np.array(
            [aggregate(r, None, "weighted_sum", {help_m: w, harm_m: round(1 - w, 10)}).utility for r in rows])
    return out


def analyse(records: Sequence[dict[str, Any]], models: dict[str, str], ks: Sequence[int], seed: int = 0
            ) -> dict[str, Any]:
    """Per-prompt expected AND-wins (P, K) for every method, and the chosen samples at max k."""
    help_m, harm_m, help_e, harm_e = models["help"], models["harm"], models["help_eval"], models["harm_eval"]
    max_k = max(ks)
    used = [r for r in records if len(r["samples"]) >= max_k and all(m in r["rewards"] for m in models.values())]
    if not used:
        raise SystemExit(f"no prompt has {max_k} samples scored under {', '.join(models.values())}")
    per_method: dict[str, list[np.ndarray]] = {}
    chosen: dict[str, list[tuple[float, float]]] = {}
    for r in used:
        rw = {m: np.asarray(r["rewards"][m][:max_k], dtype=float) for m in models.values()}
        eh, ez = rw[help_e] - np.median(rw[help_e]), rw[harm_e] - np.median(rw[harm_e])
        wins = ((eh > 0) & (ez > 0)).astype(float)  # (n,)
        for name, u in method_utilities(rw, help_m, harm_m).items():
            per_method.setdefault(name, []).append(expected_best_of_k(u, wins, ks))
            best = ranking(u)[-1]
            chosen.setdefault(name, []).append((float(eh[best]), float(ez[best])))
    wins_by = {name: np.stack(v) for name, v in per_method.items()}  # name → (P, K)
    return {"prompts": len(used), "skipped": len(records) - len(used), "ks": list(ks), "wins": wins_by,
            "chosen": chosen, "and_rate_of_sft": float(np.mean([_sft_and_rate(r, models, max_k) for r in used]))}


def _sft_and_rate(record: dict[str, Any], models: dict[str, str], n: int) -> float:
    e1 = np.asarray(record["rewards"][models["help_eval"]][:n])
    e2 = np.asarray(record["rewards"][models["harm_eval"]][:n])
    return float(((e1 > np.median(e1)) & (e2 > np.median(e2))).mean())


def summarise(analysis: dict[str, Any], seed: int = 0, n_boot: int = BOOTSTRAP) -> dict[str, Any]:
    """Mean win rates with bootstrap intervals, the best weight per k, and the paired difference."""
    rng = np.random.default_rng(seed)
    wins: dict[str, np.ndarray] = analysis["wins"]
    names = list(wins)
    stacked = np.stack([wins[n] for n in names])  # (M, P, K)
    n_prompts = stacked.shape[1]
    idx = rng.integers(0, n_prompts, size=(n_boot, n_prompts))  # (B, P)
    counts = np.stack([np.bincount(row, minlength=n_prompts) for row in idx]).astype(float)  # (B, P)
    boot = np.einsum("bp,mpk->mbk", counts, stacked) / n_prompts  # (M, B, K), no (M, B, P, K) copy
    means = stacked.mean(axis=1)  # (M, K)
    weighted = [i for i, n in enumerate(names) if n != TRANSFORMED]
    t = names.index(TRANSFORMED)
    best_w = [names[weighted[int(np.argmax(means[weighted, j]))]] for j in range(len(analysis["ks"]))]
    # paired difference, the best weight re-chosen within each replicate
    diff = boot[t] - boot[weighted].max(axis=0)  # (B, K)
    rows = []
    for i, name in enumerate(names):
        for j, k in enumerate(analysis["ks"]):
            lo, hi = np.quantile(boot[i, :, j], [0.025, 0.975])
            rows.append({"method": name, "k": k, "kl": kl_best_of_k(k), "win_rate": float(means[i, j]),
                         "ci_low": float(lo), "ci_high": float(hi), "best_weight_at_k": best_w[j] == name})
    comparison = []
    for j, k in enumerate(analysis["ks"]):
        b = names.index(best_w[j])
        lo, hi = np.quantile(diff[:, j], [0.025, 0.975])
        comparison.append({"k": k, "kl": kl_best_of_k(k), "transformed": float(means[t, j]),
                           "best_weighted": best_w[j], "best_weighted_rate": float(means[b, j]),
                           "diff": float(means[t, j] - means[b, j]), "diff_ci": [float(lo), float(hi)]})
    return {"rows": rows, "comparison": comparison, "names": names}


def conclusion(comparison: Sequence[dict[str, Any]]) -> str:
    ks = [c for c in comparison if c["k"] > 1]
    if not ks:
        return "Nothing to compare: at k = 1 every method picks a random sample."
    ahead = [c["k"] for c in ks if c["diff"] > 0]
    clear = [c["k"] for c in ks if c["diff_ci"][0] > 0]
    behind = [c["k"] for c in ks if c["diff_ci"][1] < 0]
    if len(clear) == len(ks):
        head = "The paper's claim holds here: the transformed sum wins AND more often than the best weighted raw sum at every k > 1, beyond the 95% interval."
    elif len(ahead) == len(ks):
        head = "Consistent with the paper but not conclusive here: the transformed sum is ahead at every k > 1, but the 95% interval of the difference excludes 0 only at k ∈ {" + ", ".join(map(str, clear)) + "}."
    elif behind:
        head = "Not here: the best weighted raw sum is ahead beyond the 95% interval at k ∈ {" + ", ".join(map(str, behind)) + "}."
    else:
        head = "Not shown here: the difference is within noise (the transformed sum ahead at " + f"{len(ahead)} of {len(ks)} values of k > 1, no difference outside its 95% interval)."
    return head


def write_outputs(analysis: dict[str, Any], summary: dict[str, Any], out: Path, info: dict[str, Any]) -> dict[str, Path]:
    from trainer.plots import pyplot, save

    out.mkdir(parents=True, exist_ok=True)
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(summary["rows"][0]))
        writer.writeheader()
        writer.writerows(summary["rows"])
    (out / "results.json").write_text(json.dumps({"info": info, "comparison": summary["comparison"],
                                                  "rows": summary["rows"]}, indent=1) + "\n")
    plt = pyplot()
    # Figure 6a: AND-win rate against KL
    fig, ax = plt.subplots(figsize=(7, 4.5))
    by = {n: [r for r in summary["rows"] if r["method"] == n] for n in summary["names"]}
    for name, rows in by.items():
        if name != TRANSFORMED:
            ax.plot([r["kl"] for r in rows], [r["win_rate"] for r in rows], color="grey", lw=0.8, alpha=0.35)
    comp = summary["comparison"]
    kls = [c["kl"] for c in comp]
    best_rows = [next(r for r in by[c["best_weighted"]] if r["k"] == c["k"]) for c in comp]
    ax.plot(kls, [r["win_rate"] for r in best_rows], color="C1", marker="s", label="weighted raw sum, best w per k")
    ax.fill_between(kls, [r["ci_low"] for r in best_rows], [r["ci_high"] for r in best_rows], color="C1", alpha=0.15)
    rows = by[TRANSFORMED]
    ax.plot(kls, [r["win_rate"] for r in rows], color="C0", marker="o", label="sum of transformed rewards (AND)")
    ax.fill_between(kls, [r["ci_low"] for r in rows], [r["ci_high"] for r in rows], color="C0", alpha=0.15)
    ax.plot([], [], color="grey", lw=0.8, alpha=0.5, label="weighted raw sum, w = 0.1 … 0.9")
    for c in comp[:: max(1, len(comp) // 6)]:
        ax.annotate(f"k={c['k']}", (c["kl"], c["transformed"]), textcoords="offset points", xytext=(0, 8),
                    fontsize=7, ha="center", color="C0")
    ax.set(title=f"Best-of-k: helpful AND harmless win rate ({analysis['prompts']} held-out prompts)",
           xlabel="KL(best-of-k ‖ SFT) = log k − (k−1)/k", ylabel="P(both evaluators above SFT median)")
    ax.legend(loc="lower right")
    fig6 = save(fig, out / "win_rate_vs_kl.png")
    # Figure 7: evaluator rewards of the chosen samples at max k
    k = analysis["ks"][-1]
    best_name = comp[-1]["best_weighted"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6), sharex=True, sharey=True)
    for ax, name, color in zip(axes, (TRANSFORMED, best_name), ("C0", "C1")):
        pts = np.array(analysis["chosen"][name])  # (P, 2)
        both = float(((pts[:, 0] > 0) & (pts[:, 1] > 0)).mean())
        ax.scatter(pts[:, 0], pts[:, 1], s=14, alpha=0.7, color=color)
        ax.axhline(0, color="grey", lw=1)
        ax.axvline(0, color="grey", lw=1)
        ax.set(title=f"{name}: {both:.0%} in the AND quadrant", xlabel="evaluator helpful − SFT median",
               ylabel="evaluator harmless − SFT median")
    fig.suptitle(f"Evaluator rewards of the best-of-{k} sample, per prompt")
    fig7 = save(fig, out / "chosen_joint.png")
    lines = ["# Best-of-k: does AND-aggregation of transformed rewards win more often?", "",
             "Paper §5.3 (Figures 6a and 7).  Held-out alignment prompts (never used to train the reward",
             "models or fit references); samples from the SFT policy; the best of k ranked by each method;",
             "a sample wins if both evaluator models score it above the prompt's SFT median.  Every k is",
             "estimated exactly from one pass of max-k samples per prompt (expected value over uniform",
             "k-subsets).  Intervals: 95% bootstrap over prompts; the difference is paired and re-chooses",
             "the best weight inside every replicate.", "",
             f"**{conclusion(comp)}**", "",
             "| setting | value |", "|---|---|"]
    lines += [f"| {k_} | {v} |" for k_, v in info.items()]
    lines += [f"| prompts used (skipped: fewer than max-k non-empty samples) | {analysis['prompts']} "
              f"({analysis['skipped']}) |",
              f"| AND-win rate of a random SFT sample | {analysis['and_rate_of_sft']:.3f} |", "",
              "![win rate against KL](win_rate_vs_kl.png)", "",
              "| k | KL | transformed sum | best weighted raw sum (w) | difference [95% CI] |",
              "|---|---|---|---|---|"]
    for c in comp:
        lines.append(f"| {c['k']} | {c['kl']:.2f} | {c['transformed']:.3f} | {c['best_weighted_rate']:.3f} "
                     f"({c['best_weighted'].split('=')[-1]}) | {c['diff']:+.3f} [{c['diff_ci'][0]:+.3f}, "
                     f"{c['diff_ci'][1]:+.3f}] |")
    lines += ["", f"![chosen samples at k = {k}](chosen_joint.png)", "",
              "Every method and k, with intervals: `results.csv`.", ""]
    md = out / "report.md"
    md.write_text("\n".join(lines))
    return {"csv": out / "results.csv", "md": md, "fig6": fig6, "fig7": fig7}


def run(args: argparse.Namespace) -> dict[str, Path]:
    from trainer.sampling import Sampler
    from trainer.samples import fill_bank, read_bank, reward_client, sampling_args, score_bank, select_prompts

    started = time.perf_counter()
    prompts = select_prompts(args.data, args.split, args.prompts, args.heldout_fraction, args.split_seed)
    if not prompts:
        raise SystemExit(f"no prompts in split {args.split} of {args.data}")
    models = {"help": args.help_model, "harm": args.harm_model, "help_eval": args.help_evaluator,
              "harm_eval": args.harm_evaluator}
    bank = Path(args.bank)
    fill_bank(bank, prompts, lambda: Sampler(args.policy, device=args.device, dtype=args.dtype), args.k,
              sampling_args(args), policy=str(args.policy))
    with reward_client(args) as client:
        score_bank(bank, client, list(models.values()))
    wanted = set(prompts)
    records = [r for r in read_bank(bank) if r["prompt"] in wanted]
    ks = default_ks(args.k)
    analysis = analyse(records, models, ks, args.seed)
    summary = summarise(analysis, args.seed)
    info = {"policy": f"`{args.policy}`", "split": args.split, "max k": args.k, "max new tokens": args.max_new_tokens,
            "temperature": args.temperature, "ranked by": f"{models['help']}, {models['harm']}",
            "judged by": f"{models['help_eval']}, {models['harm_eval']}", "bank": f"`{bank}`",
            "wall time of this command (s)": round(time.perf_counter() - started, 1)}
    written = write_outputs(analysis, summary, Path(args.out), info)
    print(conclusion(summary["comparison"]))
    print(f"wrote {written['md']}, {written['csv']}, {written['fig6']}, {written['fig7']}")
    return written


def register(experiments: Any) -> argparse.ArgumentParser:
    from trainer.samples import add_sampling_arguments, add_service_arguments

    p = experiments.add_parser("best-of-k", help="AND-win rate of best-of-k: transformed sum vs weighted raw sum",
                               description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sampling_arguments(p, k=64)
    p.add_argument("--split", default="align_heldout")
    add_service_arguments(p)
    p.add_argument("--bank", default="runs/bank/align_heldout.jsonl", help="sample bank to use and extend")
    p.add_argument("--help-model", default="helpful")
    p.add_argument("--harm-model", default="harmless")
    p.add_argument("--help-evaluator", default="helpful-evaluator")
    p.add_argument("--harm-evaluator", default="harmless-evaluator")
    p.add_argument("--out", default="reports/best-of-k")
    p.set_defaults(func=lambda ns: (run(ns), 0)[1])
    return p
