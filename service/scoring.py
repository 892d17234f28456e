"""The scoring service: models, their queues and references, and the utility math, together.

This is what routers call.  It validates what pydantic cannot (model names, limits that come
from config, token lengths), tokenizes off the event loop, scores every model concurrently,
computes each distinct prompt's reference once, and aggregates per item in item order.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Sequence, TypeVar

from . import protocol as p
from .backends import Backend, load_backend
from .config import ModelConfig, Settings
from .cpus import cpu_budget
from .engine import BatchPolicy, Engine, EngineObserver
from .errors import InvalidRequest, NotReady, TooLarge
from .formatting import Encoded, Prompt, ResponseTooLongError
from .references import ConstantReference, ReferenceProvider, ResponsesReference, build_provider, prompt_key
from .utility import UtilityError, aggregate, check_method, check_weights

log = logging.getLogger(__name__)
T = TypeVar("T")

async def gather_or_cancel(*aws: Awaitable[T]) -> list[T]:
    """Like asyncio.gather, but the first failure cancels the rest, so a request refused by one
    model's queue does not leave its items queued (or running) in the others."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for t in tasks:
            if not t.done():
                t.cancel()
    for t in tasks:
        if t.done() and not t.cancelled() and t.exception() is not None:
            raise t.exception()  # type: ignore[misc]
    return [t.result() for t in tasks]


WARMUP = ("\n\nHuman: Hello, can you help me?\n\nAssistant:", "Of course. What do you need?")


@dataclass
class ModelHandle:
    config: ModelConfig
    backend: Backend
    reference: ReferenceProvider

    @property
    def name(self) -> str:
        return self.config.name

    def info(self) -> p.ModelInfo:
        i = self.backend.info
        return p.ModelInfo(
            revision=i.revision, backend=i.kind, dtype=i.dtype, device=i.device, max_length=i.max_length,
            style=i.style, reference=self.reference.description, path=i.path,
        )


def policy_for(settings: Settings, backend: Backend) -> BatchPolicy:
    e = settings.engine
    min_fill = e.min_fill if e.min_fill is not None else (0.0 if backend.on_gpu else 0.9)
    return BatchPolicy(
        max_batch_tokens=e.max_batch_tokens, max_batch_size=e.max_batch_size, min_fill=min_fill,
        max_wait_s=e.max_wait_ms / 1000.0, max_queue_items=e.max_queue_items,
        batch_timeout_s=e.batch_timeout_s, retry_after_s=e.retry_after_s,
    )


class ScoringService:
    def __init__(self, settings: Settings, observer: EngineObserver | None = None) -> None:
        self.settings = settings
        self.engine = Engine(observer)
        self.models: dict[str, ModelHandle] = {}
        self.ready = False
        self.draining = False
        self.started_at = time.time()

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Load every model (fails naming the model that cannot load), warm up, then ready."""
        base = Path(self.settings.base_dir) if self.settings.base_dir else None
        import torch

        threads = self.settings.engine.threads
        if not threads and torch.get_num_threads() > (budget := cpu_budget()):
            log.info("engine.threads unset: %d CPU threads, not torch's %d (the affinity mask and cgroup quota "
                     "allow %d)", budget, torch.get_num_threads(), budget)
            threads = budget
        if threads:
            torch.set_num_threads(threads)
        for cfg in self.settings.models:
            t0 = time.perf_counter()
            backend = await asyncio.to_thread(load_backend, cfg, base, threads)
            reference = build_provider(cfg.reference, base)
            self.models[cfg.name] = ModelHandle(cfg, backend, reference)
            self.engine.add(cfg.name, backend.score, policy_for(self.settings, backend), backend.info.device)
            log.info("loaded model %s (%s, %s, %s) in %.1fs", cfg.name, backend.info.kind,
                     backend.info.dtype, backend.info.device, time.perf_counter() - t0)
        self.engine.start()
        for name in self.models:
            await self._score_pairs(name, [WARMUP], allow_truncation=True)
        self.ready = True

    def begin_drain(self) -> None:
        """Shutdown's first step: not ready, and no new work; accepted work goes on."""
        self.ready = False
        self.draining = True
        self.engine.close_intake()

    async def stop(self, drain: bool = True) -> None:
        self.begin_drain()
        await self.engine.stop(drain)
        for handle in self.models.values():
            handle.backend.close()

    def model_infos(self) -> dict[str, p.ModelInfo]:
        return {name: h.info() for name, h in self.models.items()}

    # -- scoring -------------------------------------------------------------------------------
    async def _encode(
        self, name: str, pairs: Sequence[tuple[Prompt, str]], allow_truncation: bool
    ) -> list[Encoded | ResponseTooLongError]:
        fmt = self.models[name].backend.formatter
        return await asyncio.to_thread(fmt.encode_many, pairs, allow_truncation)

    async def _score_pairs(self, name: str, pairs: Sequence[tuple[Prompt, str]], allow_truncation: bool) -> list[float]:
        encoded = await self._encode(name, pairs, allow_truncation)
        bad = [e for e in encoded if isinstance(e, ResponseTooLongError)]
        if bad:
            raise InvalidRequest(f"model {name!r}: reference response does not fit: {bad[0]}", "references")
        return await self.engine.score(name, encoded)  # type: ignore[arg-type]

    def _select(self, req: p.ScoreRequest) -> tuple[list[str], str]:
        names = list(req.models) if req.models else self.settings.default_model_names
        unknown = [n for n in names if n not in self.models]
        if unknown:
            raise InvalidRequest(
                f"unknown model(s): {', '.join(unknown)}; hosted: {', '.join(self.models)}", "models")
        if len(set(names)) != len(names):
            raise InvalidRequest("models lists a model more than once", "models")
        method = req.method or self.settings.default_method
        try:
            check_method(method, len(names))
            check_weights(req.weights, names)
        except UtilityError as exc:
            raise InvalidRequest(str(exc), exc.field) from None
        for name, ref in (req.references or {}).items():
            if name not in names:
                raise InvalidRequest(f"references names {name!r}, which is not scored in this request", "references")
            if isinstance(ref, p.ReferenceOverride) and ref.values is not None and len(ref.values) != len(req.items):
                raise InvalidRequest(
                    f"references.{name}.values has {len(ref.values)} values for {len(req.items)} items",
                    f"references.{name}.values")
        return names, method

    def _check_limits(self, req: p.ScoreRequest) -> None:
        lim = self.settings.limits
        if len(req.items) > lim.max_items_per_request:
            raise TooLarge(f"{len(req.items)} items, over the limit of {lim.max_items_per_request} per request", "items")
        for i, item in enumerate(req.items):
            prompt_chars = len(item.prompt) if isinstance(item.prompt, str) else sum(len(m.content) for m in item.prompt)
            for field, n in (("prompt", prompt_chars), ("response", len(item.response))):
                if n > lim.max_chars_per_text:
                    raise TooLarge(f"items.{i}.{field} has {n} characters, over the limit of {lim.max_chars_per_text}",
                                   f"items.{i}.{field}")

    def _provider(self, name: str, req: p.ScoreRequest) -> ReferenceProvider | list[float]:
        override = (req.references or {}).get(name)
        if override is None:
            return self.models[name].reference
        if isinstance(override, float | int):
            return ConstantReference(float(override))
        if override.constant is not None:
            return ConstantReference(override.constant)
        if override.values is not None:
            return list(override.values)
        return ResponsesReference(override.responses or [], cache_size=0)

    async def _score_model(
        self, name: str, req: p.ScoreRequest, prompts: list[Prompt]
    ) -> tuple[list[float], list[float], list[Encoded]]:
        pairs = [(prompt, it.response) for prompt, it in zip(prompts, req.items)]
        encoded = await self._encode(name, pairs, req.allow_truncation)
        for i, e in enumerate(encoded):
            if isinstance(e, ResponseTooLongError):
                raise InvalidRequest(f"model {name!r}: {e}", f"items.{i}.response")
        ok: list[Encoded] = encoded  # type: ignore[assignment]
        provider = self._provider(name, req)

        async def references() -> list[float]:
            if isinstance(provider, list):
                return provider
            unique: dict[str, Prompt] = {}
            for prompt in prompts:
                unique.setdefault(prompt_key(prompt), prompt)
            values = await provider.references(
                list(unique.values()), lambda pr: self._score_pairs(name, pr, allow_truncation=True))
            by_key = dict(zip(unique, values))
            return [by_key[prompt_key(prompt)] for prompt in prompts]

        rewards, refs = await gather_or_cancel(self.engine.score(name, ok), references())
        return rewards, refs, ok

    async def score(self, req: p.ScoreRequest) -> p.ScoreResponse:
        if not self.ready:
            raise NotReady("models are loading or the service is shutting down", self.settings.engine.retry_after_s)
        self._check_limits(req)
        names, method = self._select(req)
        for name in names:  # refuse early when a queue is full: before the tokenizing
            self.engine.queues[name].admit(len(req.items))
        prompts: list[Prompt] = [
            it.prompt if isinstance(it.prompt, str) else [m.model_dump() for m in it.prompt] for it in req.items
        ]
        per_model = await gather_or_cancel(*(self._score_model(n, req, prompts) for n in names))
        results = []
        for i in range(len(req.items)):
            rewards = {n: per_model[k][0][i] for k, n in enumerate(names)}
            refs = {n: per_model[k][1][i] for k, n in enumerate(names)}
            try:
                u = aggregate(rewards, refs, method, req.weights)
            except UtilityError as exc:
                raise InvalidRequest(f"items.{i}: {exc}", exc.field) from None
            results.append(p.ScoreResult(
                rewards=rewards, references=refs, utilities=u.utilities, utility=u.utility,
                p_good=u.p_good, p_all=u.p_all,
                truncated={n: per_model[k][2][i].truncated for k, n in enumerate(names)},
                tokens={n: len(per_model[k][2][i]) for k, n in enumerate(names)},
            ))
        return p.ScoreResponse(
            results=results, models={n: self.models[n].info() for n in names}, method=method)  # type: ignore[arg-type]

    def utility(self, req: p.UtilityRequest) -> p.UtilityResponse:
        method = req.method or self.settings.default_method
        results = []
        for i, rewards in enumerate(req.rewards):
            refs = req.references[i] if req.references is not None else None
            try:
                u = aggregate(rewards, refs, method, req.weights)
            except UtilityError as exc:
                field = f"{exc.field}.{i}" if exc.field in ("rewards", "references") else exc.field
                raise InvalidRequest(f"entry {i}: {exc}", field) from None
            results.append(p.UtilityResult(utilities=u.utilities, utility=u.utility, p_good=u.p_good, p_all=u.p_all))
        return p.UtilityResponse(results=results, method=method)  # type: ignore[arg-type]
