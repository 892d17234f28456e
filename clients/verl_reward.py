"""verl custom reward functions backed by a logand service.

Per sample (verl's default ``naive`` reward manager)::

    custom_reward_function.path=clients/verl_reward.py custom_reward_function.name=compute_score

Batched (``reward_model.reward_manager=batch``: one HTTP call per batch)::

    custom_reward_function.path=clients/verl_reward.py custom_reward_function.name=compute_score_batch

The prompt must travel in the dataset's ``extra_info["prompt"]`` (an HH transcript, plain text,
or a list of chat messages): verl hands reward functions the decoded response
(``solution_str``) but not the prompt.  Configuration comes from the environment of the verl
workers: ``LOGAND_URL`` (default ``http://127.0.0.1:8000``), ``LOGAND_API_KEY``,
``LOGAND_MODELS`` (comma-separated; default: the service's), ``LOGAND_METHOD``,
``LOGAND_EMPTY_UTILITY`` (score of an empty response, not sent to the service; default −5).

Each result is a dict: ``score`` (the utility verl optimises), ``p_all``, and one
``<model>_reward`` (raw) per model, which verl logs as extra reward info.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from clients.client import client_from_env
from clients.trainers import EMPTY_UTILITY, as_pair

def _prompt_of(extra_info: Any, index: int) -> Any:
    prompt = extra_info.get("prompt") if isinstance(extra_info, dict) else None
    if prompt is None:
        raise ValueError(f"sample {index}: extra_info has no 'prompt'; add the prompt to your dataset's extra_info "
                         "so the reward models see what the response answers")
    return prompt


def compute_score_batch(data_sources: Sequence[Any], solution_strs: Sequence[str], ground_truths: Sequence[Any],
                        extra_infos: Sequence[Any], **kwargs: Any) -> list[dict[str, float]]:
    """One dict per sample (see the module docstring), from one scoring call."""
    pairs = [as_pair(_prompt_of(info, i), s) for i, (s, info) in enumerate(zip(solution_strs, extra_infos, strict=True))]
    models = [m for m in os.environ.get("LOGAND_MODELS", "").split(",") if m] or None
    todo = [p for p in pairs if p[1].strip()]
    results = iter(client_from_env().score(todo, models=models, method=os.environ.get("LOGAND_METHOD") or None,
                                          allow_truncation=True) if todo else [])
    empty = float(os.environ.get("LOGAND_EMPTY_UTILITY", EMPTY_UTILITY))
    out = []
    for _, response in pairs:
        if not response.strip():  # nothing to score: a fixed low utility, never a failed step
            out.append({"score": empty, "p_all": 0.0})
            continue
        r = next(results)
        out.append({"score": r.utility, "p_all": r.p_all, **{f"{m}_reward": v for m, v in r.rewards.items()}})
    return out


def compute_score(data_source: Any, solution_str: str, ground_truth: Any, extra_info: Any = None,
                  **kwargs: Any) -> dict[str, float]:
    """verl's per-sample signature."""
    return compute_score_batch([data_source], [solution_str], [ground_truth], [extra_info])[0]
