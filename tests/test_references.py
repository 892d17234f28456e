"""Reference providers: per-prompt caching and sharing, quantile predictor artifacts."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path
from statistics import NormalDist
from typing import Sequence

import pytest

from service.config import ReferenceConfig
from service.references import QuantilePredictor, QuantileReference, ResponsesReference, build_provider


class CountingScorer:
    """Scores a pair by its response length plus the prompt length / 100, counting calls."""

    def __init__(self) -> None:
        self.pairs: list[tuple[str, str]] = []

    async def __call__(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        await asyncio.sleep(0.01)
        self.pairs.extend(pairs)  # type: ignore[arg-type]
        return [len(r) + len(p) / 100 for p, r in pairs]


async def test_each_distinct_prompt_is_scored_once_across_requests() -> None:
    provider = ResponsesReference(["no", "nope!"])
    scorer = CountingScorer()
    prompts = ["p1", "p2", "p1", "p1", "p3"]
    a, b = await asyncio.gather(provider.references(prompts, scorer), provider.references(["p2", "p1"], scorer))
    assert a == [pytest.approx((2 + 5) / 2 + len(p) / 100) for p in prompts]
    assert b == [a[1], a[0]]
    assert len(scorer.pairs) == 3 * 2  # three distinct prompts × two reference responses
    await provider.references(["p3"], scorer)
    assert len(scorer.pairs) == 6  # cached


async def test_cache_is_bounded() -> None:
    provider = ResponsesReference(["x"], cache_size=2)
    scorer = CountingScorer()
    await provider.references(["a", "b", "c"], scorer)
    await provider.references(["a"], scorer)
    assert len(scorer.pairs) == 4


async def test_a_failed_computation_fails_its_waiters_and_is_retried() -> None:
    provider = ResponsesReference(["x"])
    calls = {"n": 0}

    async def failing(pairs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        await asyncio.sleep(0.01)
        if calls["n"] == 1:
            raise RuntimeError("model down")
        return [1.0] * len(pairs)

    results = await asyncio.gather(provider.references(["a"], failing), provider.references(["a"], failing),
                                   return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)
    assert await provider.references(["a"], failing) == [1.0]


def artifact(dim: int = 64, mean_bias: float = 1.0, std_bias: float = 0.5) -> dict:
    return {"format": "logand-quantile/1", "features": {"kind": "hashed_ngrams", "dim": dim, "ngrams": [1, 2]},
            "mean": {"weights": [0.1] * dim, "bias": mean_bias}, "std": {"weights": [0.0] * dim, "bias": std_bias}}


async def test_quantile_reference_is_mu_plus_s_sigma(tmp_path: Path) -> None:
    path = tmp_path / "q.json"
    path.write_text(json.dumps(artifact()))
    provider = build_provider(ReferenceConfig(type="quantile", path=str(path), q=0.85), None)
    assert isinstance(provider, QuantileReference)
    predictor = QuantilePredictor.load(path)
    mu, sigma = predictor.predict("hello there")
    assert sigma == pytest.approx(math.log1p(math.exp(0.5)))
    (ref,) = await provider.references(["hello there"], CountingScorer())
    assert provider.s == pytest.approx(1.0364333894937898)  # Φ⁻¹(0.85)
    assert ref == pytest.approx(mu + NormalDist().inv_cdf(0.85) * sigma)
    median = QuantileReference(predictor, q=0.5)
    assert (await median.references(["hello there"], CountingScorer()))[0] == pytest.approx(mu)


def test_bad_quantile_artifacts_are_named(tmp_path: Path) -> None:
    bad = artifact()
    bad["mean"]["weights"] = [0.0] * 3
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="bad.json.*mean.weights has 3 values"):
        QuantilePredictor.load(path)
    with pytest.raises(ValueError, match="missing.json"):
        QuantilePredictor.load(tmp_path / "missing.json")
