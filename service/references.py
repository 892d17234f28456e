"""Reference providers: what r_ref(x), "good enough for prompt x", is for one model.

``none``       r_ref = 0.
``constant``   one number for every prompt (e.g. the median reward of held-out responses).
``responses``  r_ref(x) = mean over reference responses y_ref of r(x, y_ref) — the paper's
               "I can't answer that." for harmlessness; cached per prompt, and computed once
               per distinct prompt however many items (best-of-k, PPO groups) share it.
``quantile``   r_ref(x) = μ(x) + s·σ(x) from a fitted predictor artifact, s = Φ⁻¹(q).
Per request, callers may override with a constant, per-item values, or reference responses.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import re
from abc import ABC, abstractmethod
from collections import OrderedDict
from pathlib import Path
from statistics import NormalDist
from typing import Any, Awaitable, Callable, Sequence

from .config import ReferenceConfig
from .formatting import Prompt, prompt_as_text
from .modelpath import resolve_model_path

# Scores (prompt, response) pairs with the provider's model: the scoring service supplies it.
PairScorer = Callable[[Sequence[tuple[Prompt, str]]], Awaitable[list[float]]]


def prompt_key(prompt: Prompt) -> str:
    return prompt_as_text(prompt)


class ReferenceProvider(ABC):
    description = "none"

    @abstractmethod
    async def references(self, prompts: Sequence[Prompt], score: PairScorer) -> list[float]:
        """One r_ref per prompt, in order."""


class NoReference(ReferenceProvider):
    async def references(self, prompts: Sequence[Prompt], score: PairScorer) -> list[float]:
        return [0.0] * len(prompts)


class ConstantReference(ReferenceProvider):
    def __init__(self, value: float) -> None:
        self.value = float(value)
        self.description = f"constant {self.value:g}"

    async def references(self, prompts: Sequence[Prompt], score: PairScorer) -> list[float]:
        return [self.value] * len(prompts)


class ResponsesReference(ReferenceProvider):
    """Mean reward of fixed reference responses for the prompt, cached per prompt (LRU)."""

    def __init__(self, responses: Sequence[str], cache_size: int = 100_000) -> None:
        self.responses = [r for r in responses if r.strip()]
        if not self.responses:
            raise ValueError("reference responses must not be empty")
        self.cache_size = cache_size
        self._cache: OrderedDict[str, float] = OrderedDict()
        self._inflight: dict[str, asyncio.Future[float]] = {}
        shown = "; ".join(self.responses[:2]) + (" …" if len(self.responses) > 2 else "")
        self.description = f"responses ({len(self.responses)}): {shown}"

    async def references(self, prompts: Sequence[Prompt], score: PairScorer) -> list[float]:
        keys = [prompt_key(p) for p in prompts]
        todo: dict[str, Prompt] = {}
        waits: dict[str, asyncio.Future[float]] = {}
        out: dict[str, float] = {}
        for key, prompt in zip(keys, prompts):
            if key in out or key in todo or key in waits:
                continue
            if key in self._cache:
                out[key] = self._cache[key]
                self._cache.move_to_end(key)
                continue
            if key in self._inflight:  # another request is already computing it
                waits[key] = self._inflight[key]
            else:
                todo[key] = prompt
        if todo:
            loop = asyncio.get_running_loop()
            mine = {k: loop.create_future() for k in todo}
            self._inflight.update(mine)
            try:
                pairs = [(p, r) for p in todo.values() for r in self.responses]
                rewards = await score(pairs)
                k = len(self.responses)
                for i, key in enumerate(todo):
                    value = math.fsum(rewards[i * k : (i + 1) * k]) / k
                    out[key] = value
                    self._store(key, value)
                    mine[key].set_result(value)
            except BaseException as exc:
                for f in mine.values():
                    if not f.done():
                        f.set_exception(exc)
                        f.exception()  # mark retrieved: waiters get it, nobody logs it as lost
                raise
            finally:
                for key in mine:
                    self._inflight.pop(key, None)
        for key, fut in waits.items():
            out[key] = await asyncio.shield(fut)
        return [out[k] for k in keys]

    def _store(self, key: str, value: float) -> None:
        if self.cache_size <= 0:
            return
        self._cache[key] = value
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)


_WORD = re.compile(r"[a-z0-9']+")


def hashed_ngram_features(text: str, dim: int, ngrams: Sequence[int] = (1, 2)) -> dict[int, float]:
    """Sparse L2-normalised counts of the prompt's lowercase word n-grams, hashed into ``dim``."""
    words = _WORD.findall(text.lower())
    counts: dict[int, float] = {}
    for n in ngrams:
        for i in range(len(words) - n + 1):
            gram = " ".join(words[i : i + n]).encode()
            idx = int.from_bytes(hashlib.blake2b(gram, digest_size=8).digest(), "little") % dim
            counts[idx] = counts.get(idx, 0.0) + 1.0
    norm = math.sqrt(sum(v * v for v in counts.values())) or 1.0
    return {k: v / norm for k, v in counts.items()}


class QuantilePredictor:
    """μ(x) and σ(x) from linear models on hashed word n-grams of the prompt (torch-free).

    Artifact (JSON): ``{"format": "logand-quantile/1", "features": {"kind": "hashed_ngrams",
    "dim": D, "ngrams": [1, 2]}, "mean": {"weights": [D floats], "bias": b},
    "std": {"weights": [D floats], "bias": b, "mean_error": e}}``;
    σ(x) = sqrt(softplus(std·φ(x) + b)² + e²) > 0.  ``mean_error`` (default 0) is the mean
    model's cross-validated error: with it, μ(x) + Φ⁻¹(q)·σ(x) is the q-quantile of the
    *predictive* distribution of a new prompt's rewards (μ itself is only an estimate).
    """

    FORMAT = "logand-quantile/1"

    def __init__(self, artifact: dict[str, Any], source: str = "") -> None:
        if artifact.get("format") != self.FORMAT:
            raise ValueError(f"{source}: not a {self.FORMAT} artifact (format={artifact.get('format')!r})")
        feats = artifact["features"]
        if feats.get("kind") != "hashed_ngrams":
            raise ValueError(f"{source}: unsupported feature kind {feats.get('kind')!r}")
        self.dim = int(feats["dim"])
        self.ngrams = [int(n) for n in feats.get("ngrams", [1, 2])]
        self.mean_w, self.mean_b = self._linear(artifact, "mean", source)
        self.std_w, self.std_b = self._linear(artifact, "std", source)
        self.mean_error = float(artifact["std"].get("mean_error", 0.0))
        if not math.isfinite(self.mean_error) or self.mean_error < 0:
            raise ValueError(f"{source}: std.mean_error must be a finite number ≥ 0")

    def _linear(self, artifact: dict[str, Any], key: str, source: str) -> tuple[list[float], float]:
        part = artifact[key]
        w = [float(v) for v in part["weights"]]
        if len(w) != self.dim:
            raise ValueError(f"{source}: {key}.weights has {len(w)} values, features.dim is {self.dim}")
        return w, float(part["bias"])

    @classmethod
    def load(cls, path: str | Path) -> "QuantilePredictor":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"quantile artifact {path}: {exc}") from exc
        return cls(data, str(path))

    def features(self, text: str) -> dict[int, float]:
        return hashed_ngram_features(text, self.dim, self.ngrams)

    def predict(self, text: str) -> tuple[float, float]:
        phi = self.features(text)
        mu = self.mean_b + sum(self.mean_w[i] * v for i, v in phi.items())
        z = self.std_b + sum(self.std_w[i] * v for i, v in phi.items())
        sigma = z + math.log1p(math.exp(-z)) if z > 0 else math.log1p(math.exp(z))
        return mu, math.hypot(sigma, self.mean_error)


class QuantileReference(ReferenceProvider):
    def __init__(self, predictor: QuantilePredictor, q: float | None = None, s: float | None = None) -> None:
        if (q is None) == (s is None):
            raise ValueError("give exactly one of q or s")
        self.predictor = predictor
        self.s = NormalDist().inv_cdf(q) if q is not None else float(s)  # type: ignore[arg-type]
        self.description = f"quantile μ(x) + {self.s:.4g}·σ(x)" + (f" (q={q:g})" if q is not None else "")

    async def references(self, prompts: Sequence[Prompt], score: PairScorer) -> list[float]:
        out = []
        for p in prompts:
            mu, sigma = self.predictor.predict(prompt_key(p))
            out.append(mu + self.s * sigma)
        return out


def build_provider(cfg: ReferenceConfig, base_dir: Path | None) -> ReferenceProvider:
    if cfg.type == "constant":
        return ConstantReference(cfg.value)
    if cfg.type == "responses":
        return ResponsesReference(cfg.responses, cfg.cache_size)
    if cfg.type == "quantile":
        assert cfg.path is not None
        return QuantileReference(QuantilePredictor.load(resolve_model_path(cfg.path, base_dir)), cfg.q, cfg.s)
    return NoReference()
