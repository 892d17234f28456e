"""Reward functions that point RL trainers at a logand service, with no code of the user's own.

TRL (``GRPOTrainer``, and any trainer taking ``reward_funcs``)::

    from clients.trainers import LogandReward, AsyncLogandReward
    trainer = GRPOTrainer(model=..., reward_funcs=[LogandReward("http://127.0.0.1:8000")], ...)
    # or reward_funcs=[AsyncLogandReward(...)]: TRL awaits it alongside its other async rewards

Both take ``(prompts, completions, **kwargs) -> list[float]`` with plain-text or conversational
(list-of-messages) prompts and completions, return the service's utility (by default
Σ log σ(r − r_ref), "good in all properties"), and log each model's mean raw reward through
TRL's ``log_metric`` when the trainer provides it.  An empty completion gets ``empty_utility``
(default −5) without a call: the service has nothing to score, and one bad sample must not stop
a training step.

verl: see :mod:`clients.verl_reward` (``compute_score`` and ``compute_score_batch``).
"""

from __future__ import annotations

from statistics import fmean
from typing import Any, Callable, Sequence

from clients.client import AsyncRewardClient, RewardClient
from service.formatting import Prompt
from service.protocol import ScoreResult


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    # multimodal-style content: a list of parts, keep the text ones
    return "".join(part.get("text", "") for part in content if isinstance(part, dict))


def as_pair(prompt: Any, completion: Any) -> tuple[Prompt, str]:
    """(prompt, response) from TRL's plain-text or conversational forms."""
    if isinstance(completion, list):
        response = "".join(_text(m.get("content", "")) for m in completion if m.get("role", "assistant") == "assistant")
    else:
        response = str(completion)
    if isinstance(prompt, list):
        return [{"role": m["role"], "content": _text(m["content"])} for m in prompt], response
    return str(prompt), response


EMPTY_UTILITY = -5.0  # an empty completion is not sent to the service (it has nothing to score)


def fill_empty(pairs: Sequence[tuple[Prompt, str]], scored: Any, empty_utility: float) -> tuple[list[float], list[Any]]:
    """Utilities in input order: the service's for non-empty completions, ``empty_utility`` else."""
    results = list(scored)
    out, it = [], iter(results)
    for _, response in pairs:
        out.append(next(it).utility if response.strip() else empty_utility)
    return out, results


class _RewardBase:
    def __init__(self, url: str, models: Sequence[str] | None, method: str | None, name: str,
                 empty_utility: float) -> None:
        self.url = url
        self.models = list(models) if models else None
        self.method = method
        self.empty_utility = empty_utility
        self.__name__ = name  # TRL names the reward in its logs after this

    def _log(self, results: list[ScoreResult], log_metric: Callable[[str, float], None] | None) -> None:
        if log_metric is None or not results:
            return
        for model in results[0].rewards:
            log_metric(f"{self.__name__}/{model}/raw_reward", fmean(r.rewards[model] for r in results))
        log_metric(f"{self.__name__}/p_all", fmean(r.p_all for r in results))


class LogandReward(_RewardBase):
    """Synchronous TRL reward function backed by :class:`clients.client.RewardClient`."""

    def __init__(self, url: str = "http://127.0.0.1:8000", *, models: Sequence[str] | None = None,
                 method: str | None = None, api_key: str | None = None, name: str = "logand",
                 empty_utility: float = EMPTY_UTILITY, **client_kwargs: Any) -> None:
        super().__init__(url, models, method, name, empty_utility)
        self.client = RewardClient(url, api_key=api_key, **client_kwargs)

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        pairs = [as_pair(p, c) for p, c in zip(prompts, completions, strict=True)]
        todo = [pr for pr in pairs if pr[1].strip()]
        scored = self.client.score(todo, models=self.models, method=self.method, allow_truncation=True) if todo else []
        utilities, results = fill_empty(pairs, scored, self.empty_utility)
        self._log(results, kwargs.get("log_metric"))
        return utilities


class AsyncLogandReward(_RewardBase):
    """``async`` TRL reward function backed by :class:`clients.client.AsyncRewardClient`."""

    def __init__(self, url: str = "http://127.0.0.1:8000", *, models: Sequence[str] | None = None,
                 method: str | None = None, api_key: str | None = None, name: str = "logand_async",
                 empty_utility: float = EMPTY_UTILITY, **client_kwargs: Any) -> None:
        super().__init__(url, models, method, name, empty_utility)
        self.api_key = api_key
        self.client_kwargs = client_kwargs

    async def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        pairs = [as_pair(p, c) for p, c in zip(prompts, completions, strict=True)]
        todo = [pr for pr in pairs if pr[1].strip()]
        scored: list[Any] = []
        if todo:  # one client per call: trainers may run each call on a fresh event loop
            async with AsyncRewardClient(self.url, api_key=self.api_key, **self.client_kwargs) as client:
                scored = await client.score(todo, models=self.models, method=self.method, allow_truncation=True)
        utilities, results = fill_empty(pairs, scored, self.empty_utility)
        self._log(results, kwargs.get("log_metric"))
        return utilities
