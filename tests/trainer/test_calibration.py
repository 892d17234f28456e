"""Calibration of reference quantiles: the coverage arithmetic on banks with a known answer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.stats

from service.cli import main
from service.references import QuantilePredictor, QuantileReference
from trainer.calibration import LEVELS, calibrate
from trainer.fit_reference import fit_predictor
from trainer.samples import write_bank


@pytest.mark.parametrize("q", [0.05, 0.5, 0.75, 0.85, 0.95, 0.999])
def test_quantile_reference_uses_the_normal_quantile(q: float) -> None:
    predictor = QuantilePredictor(fit_predictor(["a b", "c d"], [1.0, 2.0], [0.5, 0.7]), "test")
    assert QuantileReference(predictor, q=q).s == pytest.approx(scipy.stats.norm.ppf(q), rel=1e-9, abs=1e-12)


def _bank(rng: np.random.Generator, prompts: int, k: int, offset: int) -> list[dict]:
    """Rewards ~ N(μ(x), σ(x)): 'riddle' prompts are hard (low, spread), 'hello' prompts easy."""
    out = []
    for i in range(prompts):
        hard = i % 2 == 0
        prompt = f"{'riddle puzzle' if hard else 'greeting hello'} number {offset + i}"
        mu, sd = (-1.0, 1.5) if hard else (2.0, 0.3)
        out.append({"prompt": prompt, "samples": ["x"] * k, "rewards": {"m": rng.normal(mu, sd, k).tolist()}})
    return out


def test_a_good_predictor_is_calibrated_and_beats_the_constant(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    train, heldout = _bank(rng, 120, 32, 0), _bank(rng, 60, 200, 1000)
    artifact = fit_predictor([r["prompt"] for r in train], [np.mean(r["rewards"]["m"]) for r in train],
                             [np.std(r["rewards"]["m"], ddof=1) for r in train], l2=0.1)
    result = calibrate(heldout, train, QuantilePredictor(artifact, "t"), "m")
    for row in result["levels"]:
        assert row["predicted"]["coverage"] == pytest.approx(row["q"], abs=0.05)
        assert row["normal_oracle"]["coverage"] == pytest.approx(row["q"], abs=0.03)
        # the mixture's global quantile covers easy prompts fully and hard ones barely
        assert row["abs_error_diff"]["ci"][1] < 0
        assert row["constant"]["abs_error"] > 2 * row["predicted"]["abs_error"]

    # through the CLI: the report, its JSON and the plot are written
    (tmp_path / "ref").mkdir()
    (tmp_path / "ref" / "m.quantile.json").write_text(json.dumps(artifact))
    write_bank(tmp_path / "train.jsonl", train)
    write_bank(tmp_path / "held.jsonl", heldout)
    assert main(["calibrate-reference", "--references", str(tmp_path / "ref"), "--train-bank",
                 str(tmp_path / "train.jsonl"), "--heldout-bank", str(tmp_path / "held.jsonl"), "--models", "m",
                 "--out", str(tmp_path / "report")]) == 0
    md = (tmp_path / "report" / "calibration.md").read_text()
    assert "target met" in md and "| 0.85 |" in md
    assert (tmp_path / "report" / "calibration.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / "report" / "calibration.json").read_text())
    assert [r["q"] for r in saved["results"][0]["levels"]] == list(LEVELS)


def test_a_useless_predictor_is_reported_as_missing_the_target() -> None:
    rng = np.random.default_rng(1)
    train, heldout = _bank(rng, 40, 16, 0), _bank(rng, 30, 64, 500)
    wrong = fit_predictor(["anything"] * 2, [5.0, 5.0], [0.01, 0.01])  # far too high, far too narrow
    result = calibrate(heldout, train, QuantilePredictor(wrong, "t"), "m")
    from trainer.calibration import verdict

    assert verdict(result).startswith("target not met")
    assert all(r["predicted"]["coverage"] == 1.0 for r in result["levels"])
