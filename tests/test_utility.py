"""Utility math: exact formulas, stability, and the paper's properties (hypothesis)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.utility import UtilityError, aggregate, log_sigmoid, p_good, sigmoid, softplus, transform

finite = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, allow_infinity=False)


def test_transform_matches_definition_where_naive_form_is_safe() -> None:
    for r, ref in [(0.0, 0.0), (1.3, -0.2), (-4.0, 2.5), (10.0, 3.0)]:
        naive = math.log(1.0 / (1.0 + math.exp(-(r - ref))))
        assert transform(r, ref) == pytest.approx(naive, rel=1e-12, abs=1e-15)
    assert transform(0.0) == pytest.approx(-math.log(2))


@given(finite, finite)
def test_stable_and_finite_up_to_1e4(r: float, ref: float) -> None:
    u = transform(r, ref)
    assert math.isfinite(u)
    assert u <= 0.0
    assert 0.0 <= p_good(r, ref) <= 1.0


@given(finite, finite, st.floats(min_value=1e-3, max_value=1e3))
def test_monotone_in_reward(r: float, ref: float, delta: float) -> None:
    assert transform(r + delta, ref) >= transform(r, ref)


@given(st.floats(min_value=40, max_value=1e4))
def test_tends_to_zero_when_reward_far_above_reference(margin: float) -> None:
    assert -1e-15 <= transform(margin, 0.0) <= 0.0


@given(st.floats(min_value=-1e4, max_value=-40))
def test_linear_when_reward_far_below_reference(margin: float) -> None:
    assert transform(margin, 0.0) == pytest.approx(margin, rel=1e-12)


@given(finite, finite, st.floats(min_value=-1e3, max_value=1e3))
def test_invariant_to_a_common_shift(r: float, ref: float, c: float) -> None:
    assert transform(r + c, ref + c) == pytest.approx(transform(r, ref), rel=1e-9, abs=1e-9)


@given(finite)
def test_log_sigmoid_is_minus_softplus_and_log_of_sigmoid(x: float) -> None:
    assert log_sigmoid(x) == -softplus(-x)
    s = sigmoid(x)
    if s > 1e-300:
        assert log_sigmoid(x) == pytest.approx(math.log(s), rel=1e-9, abs=1e-12)


def test_and_aggregation_is_sum_of_logs_and_p_all_is_product() -> None:
    rewards = {"helpful": 1.5, "harmless": -0.5}
    refs = {"helpful": 0.5, "harmless": 0.25}
    u = aggregate(rewards, refs, "log_sigmoid_sum")
    assert u.utility == pytest.approx(transform(1.5, 0.5) + transform(-0.5, 0.25))
    assert u.p_all == pytest.approx(sigmoid(1.0) * sigmoid(-0.75))
    assert u.p_good == {"helpful": pytest.approx(sigmoid(1.0)), "harmless": pytest.approx(sigmoid(-0.75))}


def test_and_aggregation_punishes_one_bad_property_more_than_raw_sum() -> None:
    """The paper's point: a huge reward in one property cannot buy off a bad one."""
    balanced = {"helpful": 1.0, "harmless": 1.0}
    lopsided = {"helpful": 8.0, "harmless": -4.0}
    assert aggregate(lopsided, method="weighted_sum").utility > aggregate(balanced, method="weighted_sum").utility
    assert aggregate(lopsided).utility < aggregate(balanced).utility


def test_weighted_sum_baseline_uses_raw_rewards() -> None:
    u = aggregate({"helpful": 2.0, "harmless": -1.0}, {"helpful": 5.0}, "weighted_sum",
                  {"helpful": 0.3, "harmless": 0.7})
    assert u.utility == pytest.approx(0.3 * 2.0 + 0.7 * -1.0)
    assert aggregate({"a": 2.0, "b": 4.0}, method="weighted_sum").utility == pytest.approx(3.0)


def test_single_model_methods() -> None:
    assert aggregate({"a": 2.0}, {"a": 1.0}, "raw").utility == 2.0
    assert aggregate({"a": 2.0}, {"a": 1.0}, "transformed").utility == pytest.approx(transform(2.0, 1.0))
    with pytest.raises(UtilityError, match="exactly one model") as exc:
        aggregate({"a": 1.0, "b": 2.0}, method="raw")
    assert exc.value.field == "models"


@pytest.mark.parametrize("kwargs, field", [
    ({"rewards": {"a": float("nan")}}, "rewards"),
    ({"rewards": {"a": 1.0}, "references": {"a": float("inf")}}, "references"),
    ({"rewards": {"a": 1.0}, "references": {"b": 0.0}}, "references"),
    ({"rewards": {"a": 1.0}, "weights": {"b": 1.0}}, "weights"),
    ({"rewards": {"a": 1.0}, "method": "max"}, "method"),
    ({"rewards": {}}, "rewards"),
])
def test_bad_inputs_name_their_field(kwargs: dict, field: str) -> None:
    with pytest.raises(UtilityError) as exc:
        aggregate(**kwargs)
    assert exc.value.field == field


def test_utility_module_imports_without_torch() -> None:
    import subprocess
    import sys

    code = ("import sys; import service.utility, service.protocol; "
            "assert 'torch' not in sys.modules and 'fastapi' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


@settings(max_examples=50)
@given(st.dictionaries(st.sampled_from(["a", "b", "c"]), finite, min_size=1))
def test_p_all_is_exp_of_sum(rewards: dict[str, float]) -> None:
    u = aggregate(rewards)
    assert u.p_all == pytest.approx(math.exp(sum(u.utilities.values())), rel=1e-9, abs=1e-300)


@given(st.dictionaries(st.sampled_from(["a", "b", "c"]), st.floats(allow_nan=False, allow_infinity=False),
                       min_size=1),
       st.sampled_from(["log_sigmoid_sum", "weighted_sum"]),
       st.floats(allow_nan=False, allow_infinity=False))
def test_any_finite_input_gives_a_finite_utility_or_a_clear_error(rewards: dict[str, float], method: str,
                                                                  w: float) -> None:
    """Rewards near the float limit overflow the sums: a UtilityError naming 'rewards', never an
    OverflowError (found by schemathesis at 300 examples: a 500)."""
    try:
        u = aggregate(rewards, {n: -r / 2 for n, r in rewards.items()}, method, {n: w for n in rewards})
    except UtilityError as exc:
        assert exc.field == "rewards" and "overflow" in str(exc)
        return
    assert math.isfinite(u.utility) and 0.0 <= u.p_all <= 1.0


def test_overflowing_rewards_name_the_field() -> None:
    with pytest.raises(UtilityError, match="overflows") as info:
        aggregate({"a": -1.7976931348623155e308, "b": -4.9e302})
    assert info.value.field == "rewards"
