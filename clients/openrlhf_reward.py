"""OpenRLHF reward function backed by a logand service — the way to reach a service that needs an API key::

    --remote_rm_url clients/openrlhf_reward.py

Given a URL (``--remote_rm_url http://HOST:8000/get_reward``), OpenRLHF posts to the service
itself and sends no ``Authorization`` header. Given a path to a ``.py`` file, it imports the
file in its reward workers and calls ``reward_func(queries, prompts, labels)``. This one sends
the same body to the service's ``/get_reward`` in chunks, with the key and the client's retries
(429/503/connection errors, honouring ``Retry-After``). So the text goes through the same
``compat`` handling (chat-template parsing, EOS cut, truncation) as OpenRLHF's own HTTP calls.

Configuration comes from the workers' environment: ``LOGAND_URL`` (default
``http://127.0.0.1:8000``) and ``LOGAND_API_KEY``.

It returns what OpenRLHF reads from a reward function: ``rewards`` (the configured utility,
default Σ log σ(r − r_ref)), ``scores`` (p(all good)) and ``extra_logs`` (per model: raw
reward, utility, truncated), each a float tensor with one value per query.
"""

from __future__ import annotations

from typing import Any, Sequence

from clients.client import client_from_env


def reward_func(queries: Sequence[str], prompts: Sequence[str], labels: Sequence[Any] | None = None,
                **kwargs: Any) -> dict[str, Any]:
    import torch

    client = client_from_env()
    if len(prompts) != len(queries):
        raise ValueError(f"{len(queries)} queries but {len(prompts)} prompts")
    rewards: list[float] = []
    scores: list[float] = []
    logs: dict[str, list[float]] = {}
    step = client.chunk_size
    for start in range(0, len(queries), step):  # labels stay here: the service ignores them
        out = client.request("POST", "/get_reward", {"query": list(queries[start:start + step]),
                                                     "prompts": list(prompts[start:start + step])})
        rewards += out["rewards"]
        scores += out["scores"]
        for name, values in out["extra_logs"].items():
            logs.setdefault(name, []).extend(values)
    return {"rewards": torch.tensor(rewards, dtype=torch.float32), "scores": torch.tensor(scores, dtype=torch.float32),
            "extra_logs": {name: torch.tensor(values, dtype=torch.float32) for name, values in logs.items()}}
