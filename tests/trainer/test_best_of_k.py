"""Best-of-k: the exact subsampling estimator, and both commands end to end on tiny models."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest

from service.cli import main
from tests.conftest import LiveServer
from tests.tiny import make_tiny_gpt2
from tests.trainer.test_train_rm import write_separable
from trainer.best_of_k import best_index, expected_best_of_k, kl_best_of_k, selection_weights
from trainer.bok_experiment import TRANSFORMED, analyse, conclusion, summarise


def brute_force(u: np.ndarray, w: np.ndarray, k: int) -> float:
    subsets = list(itertools.combinations(range(len(u)), k))
    return sum(w[s[best_index(u[list(s)])]] for s in subsets) / len(subsets)


@pytest.mark.parametrize("seed", range(6))
def test_subsampling_estimator_equals_brute_force_enumeration(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 8
    u = rng.integers(0, 4, n).astype(float) if seed % 2 else rng.normal(size=n)  # odd seeds: many ties
    w = rng.normal(size=n)
    ks = list(range(1, n + 1))
    got = expected_best_of_k(u, w, ks)
    assert got == pytest.approx([brute_force(u, w, k) for k in ks], abs=1e-12)
    assert got[0] == pytest.approx(w.mean()) and got[-1] == pytest.approx(w[best_index(u)])


def test_selection_weights_are_a_distribution_and_kl_matches_the_paper() -> None:
    for n, k in [(5, 1), (64, 7), (64, 64), (191, 100)]:
        assert selection_weights(n, k).sum() == pytest.approx(1.0)
    assert kl_best_of_k(1) == 0.0 and kl_best_of_k(64) == pytest.approx(math.log(64) - 63 / 64)
    with pytest.raises(ValueError):
        selection_weights(4, 5)


def _record(rng: np.random.Generator, n: int, p: int) -> dict:
    """Samples where the evaluators agree with the reward models; one property is 'bought' by
    the other in the raw scale (harm rewards are 10× larger)."""
    help_, harm = rng.normal(size=n), 10 * rng.normal(size=n)
    return {"prompt": f"p{p}", "samples": ["x"] * n,
            "rewards": {"h": help_.tolist(), "s": harm.tolist(), "he": (help_ + 0.1 * rng.normal(size=n)).tolist(),
                        "se": (harm + rng.normal(size=n)).tolist()}}


def test_analysis_favours_and_when_one_raw_scale_dominates() -> None:
    rng = np.random.default_rng(0)
    records = [_record(rng, 16, p) for p in range(60)]
    models = {"help": "h", "harm": "s", "help_eval": "he", "harm_eval": "se"}
    analysis = analyse(records, models, [1, 4, 16])
    summary = summarise(analysis, n_boot=300)
    k1 = [r for r in summary["rows"] if r["k"] == 1]
    assert len({round(r["win_rate"], 9) for r in k1}) == 1  # at k = 1 every method is a random sample
    assert summary["comparison"][-1]["diff"] > 0 and TRANSFORMED in analysis["wins"]
    assert conclusion(summary["comparison"]).startswith(("The paper's claim holds", "Consistent"))


def test_experiment_and_best_of_k_end_to_end(live_server: LiveServer, tmp_path: Path) -> None:
    policy = make_tiny_gpt2(tmp_path / "policy", seed=3, lm=True)
    data = write_separable(tmp_path / "pairs.jsonl", n=80)
    out = tmp_path / "report"
    assert main(["experiment", "best-of-k", "--policy", str(policy), "--data", str(data), "--service", live_server.url,
                 "--split", "align_train", "--prompts", "5", "--k", "4", "--max-new-tokens", "6",
                 "--bank", str(tmp_path / "bank.jsonl"), "--help-model", "enc", "--harm-model", "dec",
                 "--help-evaluator", "dec", "--harm-evaluator", "enc", "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} >= {"results.csv", "results.json", "report.md", "win_rate_vs_kl.png",
                                               "chosen_joint.png"}
    rows = (out / "results.csv").read_text().splitlines()
    assert rows[0].startswith("method,k,kl,win_rate") and len(rows) == 1 + 10 * 4  # 10 methods × k ∈ {1, 2, 3, 4}
    assert "| 4 |" in (out / "report.md").read_text()

    bok = tmp_path / "bok.jsonl"
    args = ["best-of-k", "--policy", str(policy), "--prompt", "\n\nHuman: hi there\n\nAssistant:", "--prompt",
            "tell me a story", "--k", "3", "--max-new-tokens", "6", "--service", live_server.url, "--models", "enc",
            "dec", "--out", str(bok)]
    assert main(args) == 0
    lines = [json.loads(x) for x in bok.read_text().splitlines()]
    assert len(lines) == 2
    for line in lines:
        utilities = [s["utility"] for s in line["samples"]]
        assert line["best"] == int(np.argmax(utilities)) and line["best_text"] == line["samples"][line["best"]]["text"]
        assert set(line["samples"][0]["rewards"]) == {"enc", "dec"}
    assert main(args) == 0 and len(bok.read_text().splitlines()) == 2  # a rerun skips finished prompts
