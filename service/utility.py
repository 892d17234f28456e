"""Utility math of Wang et al. 2024: pure Python, no torch, importable by clients and trainers.

For one property with Bradley–Terry reward r and per-prompt reference r_ref:

    u      = log σ(r − r_ref) = −softplus(−(r − r_ref))      (transformed reward)
    p_good = σ(r − r_ref)                                    (probability the response is good)

Over properties i, the logical AND (judgements independent given x, y):

    u_AND  = Σ_i log σ(r_i − r_ref_i),    p_all = exp(u_AND) = Π_i p_good_i

Aggregation methods:

``log_sigmoid_sum``  Σ_i w_i·u_i with w_i = 1 by default: the paper's AND.
``weighted_sum``     Σ_i w_i·r_i on *raw* rewards: the paper's baseline (w·r_help + (1−w)·r_harm);
                     weights default to 1/n each.
``transformed``      u of exactly one model.
``raw``              r of exactly one model.

p_all is always exp(Σ_i u_i) over the models scored, whatever the method, so it keeps its
meaning as a probability; per-model ``utilities`` are always the transformed rewards.
Everything is computed in the softplus form, finite for |r − r_ref| up to 1e4 and beyond.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Mapping

Method = Literal["log_sigmoid_sum", "weighted_sum", "transformed", "raw"]
METHODS: tuple[str, ...] = ("log_sigmoid_sum", "weighted_sum", "transformed", "raw")
SINGLE_MODEL_METHODS = frozenset({"transformed", "raw"})
DEFAULT_METHOD: Method = "log_sigmoid_sum"


class UtilityError(ValueError):
    """Inputs the math cannot take; ``field`` names the offending part of the request."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


def softplus(x: float) -> float:
    """log(1 + e^x), without overflow for large |x|."""
    if x > 0:
        return x + math.log1p(math.exp(-x))
    return math.log1p(math.exp(x))


def log_sigmoid(x: float) -> float:
    """log σ(x) = −softplus(−x): ≈ x for x ≪ 0, → 0⁻ for x ≫ 0."""
    return -softplus(-x)


def sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def transform(reward: float, reference: float = 0.0) -> float:
    """The transformed reward u = log σ(r − r_ref)."""
    return log_sigmoid(reward - reference)


def p_good(reward: float, reference: float = 0.0) -> float:
    return sigmoid(reward - reference)


@dataclass(frozen=True, slots=True)
class Utilities:
    utilities: dict[str, float]  # transformed reward per model
    utility: float  # the aggregate of the chosen method
    p_good: dict[str, float]
    p_all: float


def check_method(method: str, n_models: int) -> None:
    if method not in METHODS:
        raise UtilityError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}", "method")
    if method in SINGLE_MODEL_METHODS and n_models != 1:
        raise UtilityError(
            f"method {method!r} scores exactly one model, but {n_models} were selected "
            "(name one with 'models')",
            "models",
        )


def check_weights(weights: Mapping[str, float] | None, names: list[str]) -> None:
    if not weights:
        return
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise UtilityError(
            f"weights name models that are not scored here: {', '.join(unknown)} "
            f"(scored: {', '.join(names)})",
            "weights",
        )
    for name, w in weights.items():
        if not math.isfinite(w):
            raise UtilityError(f"weight for {name!r} is not a finite number", "weights")


def aggregate(
    rewards: Mapping[str, float],
    references: Mapping[str, float] | None = None,
    method: str = DEFAULT_METHOD,
    weights: Mapping[str, float] | None = None,
) -> Utilities:
    """Per-model transformed rewards, p(good), and the aggregate ``method`` of ``rewards``.

    Missing references count as 0 (no centring).  Raises :class:`UtilityError` on unknown
    methods, weights for models not in ``rewards``, or non-finite inputs.
    """
    names = list(rewards)
    if not names:
        raise UtilityError("no rewards to aggregate", "rewards")
    check_method(method, len(names))
    check_weights(weights, names)
    refs = references or {}
    for name in names:
        if not math.isfinite(rewards[name]):
            raise UtilityError(f"reward for {name!r} is not a finite number", "rewards")
        if not math.isfinite(refs.get(name, 0.0)):
            raise UtilityError(f"reference for {name!r} is not a finite number", "references")
    unknown_refs = sorted(set(refs) - set(names))
    if unknown_refs:
        raise UtilityError(f"references name models without a reward: {', '.join(unknown_refs)}", "references")

    margins = {n: rewards[n] - refs.get(n, 0.0) for n in names}
    if not all(math.isfinite(m) for m in margins.values()):
        raise UtilityError("reward − reference overflows a float: the rewards are too large", "rewards")
    utilities = {n: log_sigmoid(m) for n, m in margins.items()}
    goods = {n: sigmoid(m) for n, m in margins.items()}
    try:
        total, value = math.fsum(utilities.values()), _combine(method, names, rewards, utilities, weights)
    except (OverflowError, ValueError):  # fsum: a sum past the float range, or +inf and -inf products
        total = value = math.inf
    if not (math.isfinite(total) and math.isfinite(value)):
        raise UtilityError(f"the {method} aggregate overflows a float: the rewards or weights are too large",
                           "rewards")
    return Utilities(utilities=utilities, utility=value, p_good=goods, p_all=math.exp(total))


def _combine(method: str, names: list[str], rewards: Mapping[str, float], utilities: Mapping[str, float],
             weights: Mapping[str, float] | None) -> float:
    if method == "log_sigmoid_sum":
        w = weights or {}
        value = math.fsum(w.get(n, 1.0) * utilities[n] for n in names)
    elif method == "weighted_sum":
        w = weights or {n: 1.0 / len(names) for n in names}
        value = math.fsum(w.get(n, 0.0) * rewards[n] for n in names)
    elif method == "transformed":
        value = utilities[names[0]]
    else:  # raw
        value = rewards[names[0]]
    return value
