"""The batching engine: one bounded queue per model, token-budget batches, forward passes in a
worker thread.  Knows nothing of HTTP; errors are :mod:`service.errors` values.

How a batch is formed (``plan_batch``): the oldest waiting item always goes in (nothing
starves), then neighbours in length order are added while the batch stays within
``max_batch_size`` items, ``max_batch_tokens`` padded tokens (longest × count) and at least
``min_fill`` real-to-padded tokens.  On a CPU padding costs more than batching saves, so
``min_fill`` is high there (near exact-length buckets); on a GPU it is 0 and batches fill up.
Items left out keep their arrival order at the front of the queue.

Every item carries its own future.  A backend exception fails exactly the items of its batch,
a non-finite reward fails exactly its item, a batch past ``batch_timeout_s`` fails with
:class:`BatchTimeout`, and items whose caller has gone (future cancelled) are skipped.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

from .errors import BackendFailure, BatchTimeout, NonFiniteScore, NotReady, Overloaded
from .formatting import Encoded

log = logging.getLogger(__name__)

ScoreFn = Callable[[Sequence[Encoded]], list[float]]


@dataclass(frozen=True)
class BatchPolicy:
    max_batch_tokens: int = 16384
    max_batch_size: int = 64
    min_fill: float = 0.0
    max_wait_s: float = 0.002
    max_queue_items: int = 8192
    batch_timeout_s: float = 120.0
    retry_after_s: int = 1


@dataclass(eq=False, slots=True)
class WorkItem:
    encoded: Encoded
    future: asyncio.Future[float]
    enqueued: float = field(default_factory=time.monotonic)

    @property
    def length(self) -> int:
        return len(self.encoded)


class EngineObserver(Protocol):
    def batch_done(self, model: str, size: int, tokens: int, padded: int, forward_s: float) -> None: ...
    def queue_wait(self, model: str, seconds: float) -> None: ...
    def queue_depth(self, model: str, depth: int) -> None: ...


class _NoObserver:
    def batch_done(self, model: str, size: int, tokens: int, padded: int, forward_s: float) -> None:
        pass

    def queue_wait(self, model: str, seconds: float) -> None:
        pass

    def queue_depth(self, model: str, depth: int) -> None:
        pass


def plan_batch(lengths: Sequence[int], policy: BatchPolicy, scan: int = 512) -> list[int]:
    """Indices (into ``lengths``, in arrival order) of the next batch; index 0 is always in it."""
    n = min(len(lengths), scan)
    if n == 0:
        return []
    order = sorted(range(n), key=lambda i: (lengths[i], i))  # length-sorted, ties by arrival
    pos = order.index(0)
    lo = hi = pos
    count, total, longest = 1, lengths[0], lengths[0]

    def fits(length: int) -> float | None:
        c, t, m = count + 1, total + length, max(longest, length)
        if c > policy.max_batch_size or m * c > policy.max_batch_tokens:
            return None
        fill = t / (m * c)
        return fill if fill >= policy.min_fill else None

    while True:
        left = fits(lengths[order[lo - 1]]) if lo > 0 else None
        right = fits(lengths[order[hi + 1]]) if hi + 1 < n else None
        if left is None and right is None:
            break
        if right is None or (left is not None and left >= right):
            lo -= 1
            length = lengths[order[lo]]
        else:
            hi += 1
            length = lengths[order[hi]]
        count, total, longest = count + 1, total + length, max(longest, length)
    return sorted(order[lo : hi + 1])


class ModelQueue:
    """Queue and batcher of one model.  ``submit`` is called on the event loop."""

    def __init__(
        self, name: str, score: ScoreFn, policy: BatchPolicy, executor: ThreadPoolExecutor,
        observer: EngineObserver | None = None,
    ) -> None:
        self.name = name
        self._score = score
        self.policy = policy
        self._executor = executor
        self._observer: EngineObserver = observer or _NoObserver()
        self._pending: deque[WorkItem] = deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._accepting = False
        self._busy = 0  # items in the batch being scored

    @property
    def depth(self) -> int:
        return len(self._pending) + self._busy

    def start(self) -> None:
        self._accepting = True
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"batcher-{self.name}")

    @property
    def full(self) -> bool:
        """No room for another item (readiness reports it)."""
        return self.depth >= self.policy.max_queue_items

    def admit(self, n: int) -> None:
        """Raise what ``submit`` of ``n`` items would raise now (429 / 503).  Called before a
        request is tokenized, so an overloaded server refuses work without paying for it."""
        if not self._accepting:
            raise NotReady(f"model {self.name!r} is not accepting work (starting or shutting down)",
                           self.policy.retry_after_s)
        if len(self._pending) + n > self.policy.max_queue_items:
            raise Overloaded(
                f"model {self.name!r} queue is full ({len(self._pending)} waiting, "
                f"limit {self.policy.max_queue_items}); retry later",
                self.policy.retry_after_s,
            )

    def submit(self, encoded: Sequence[Encoded]) -> list[asyncio.Future[float]]:
        """Enqueue all of ``encoded`` or none of it (429 when the queue has no room)."""
        self.admit(len(encoded))
        loop = asyncio.get_running_loop()
        items = [WorkItem(e, loop.create_future()) for e in encoded]
        self._pending.extend(items)
        self._observer.queue_depth(self.name, len(self._pending))
        self._wakeup.set()
        return [it.future for it in items]

    def close_intake(self) -> None:
        """Refuse new work (503) from now on; what was accepted is still scored."""
        self._accepting = False
        self._wakeup.set()

    async def stop(self, drain: bool = True) -> None:
        """Stop accepting; with ``drain`` finish what was accepted, else fail it."""
        self._accepting = False
        if not drain:
            for it in self._pending:
                if not it.future.done():
                    it.future.set_exception(NotReady(f"model {self.name!r} shut down before scoring"))
            self._pending.clear()
        self._wakeup.set()
        if self._task is not None:
            await self._task
            self._task = None

    def _take_batch(self) -> list[WorkItem]:
        while self._pending and self._pending[0].future.done():  # caller gone: skip its work
            self._pending.popleft()
        if not self._pending:
            return []
        chosen = plan_batch([it.length for it in self._pending], self.policy)
        picked = set(chosen)
        batch = [self._pending[i] for i in chosen]
        rest = [it for i, it in enumerate(self._pending) if i not in picked]
        self._pending = deque(rest)
        return [it for it in batch if not it.future.done()]

    async def _run(self) -> None:
        while True:
            if not self._pending:
                if not self._accepting:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if self.policy.max_wait_s > 0 and len(self._pending) < self.policy.max_batch_size and self._accepting:
                await asyncio.sleep(self.policy.max_wait_s)  # let concurrent callers join this batch
            batch = self._take_batch()
            if batch:
                await self._run_batch(batch)

    async def _run_batch(self, batch: list[WorkItem]) -> None:
        now = time.monotonic()
        for it in batch:
            self._observer.queue_wait(self.name, now - it.enqueued)
        self._busy = len(batch)
        encoded = [it.encoded for it in batch]
        loop = asyncio.get_running_loop()
        started_evt = asyncio.Event()

        def forward() -> list[float]:
            loop.call_soon_threadsafe(started_evt.set)
            return self._score(encoded)

        job = loop.run_in_executor(self._executor, forward)
        try:
            # The timeout counts from the moment the forward starts, not while it waits for the
            # device's thread (another model's batch may be running there).
            waiter = asyncio.ensure_future(started_evt.wait())
            either: set[asyncio.Future[Any]] = {job, waiter}
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            started = time.perf_counter()
            scores = await asyncio.wait_for(asyncio.shield(job), self.policy.batch_timeout_s)
            if len(scores) != len(batch):
                raise RuntimeError(f"backend returned {len(scores)} scores for {len(batch)} items")
        except asyncio.TimeoutError:
            # The stuck thread cannot be killed; later batches get a fresh one so the model
            # keeps serving, and the stuck one is dropped when (if) it returns.
            self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"forward-{self.name}")
            job.add_done_callback(lambda f: f.exception())  # consume its eventual result
            self._fail(batch, BatchTimeout(
                f"model {self.name!r}: forward pass exceeded {self.policy.batch_timeout_s:g}s"))
            return
        except Exception as exc:  # any backend failure fails this batch and only this batch
            log.exception("model %s: batch of %d failed", self.name, len(batch))
            self._fail(batch, BackendFailure(f"model {self.name!r} failed on a batch: {type(exc).__name__}: {exc}"))
            return
        finally:
            self._busy = 0
            self._observer.queue_depth(self.name, len(self._pending))
        elapsed = time.perf_counter() - started
        longest = max(it.length for it in batch)
        self._observer.batch_done(self.name, len(batch), sum(it.length for it in batch), longest * len(batch), elapsed)
        for it, score in zip(batch, scores):
            if it.future.done():
                continue
            if math.isfinite(score):
                it.future.set_result(float(score))
            else:
                it.future.set_exception(NonFiniteScore(f"model {self.name!r} returned a non-finite score ({score})"))

    @staticmethod
    def _fail(batch: list[WorkItem], exc: Exception) -> None:
        for it in batch:
            if not it.future.done():
                it.future.set_exception(exc)


class Engine:
    """All model queues; forwards on one device run one at a time (they share its cores)."""

    def __init__(self, observer: EngineObserver | None = None) -> None:
        self._observer = observer
        self.queues: dict[str, ModelQueue] = {}
        self._executors: dict[str, ThreadPoolExecutor] = {}

    def add(self, name: str, score: ScoreFn, policy: BatchPolicy, device: str) -> ModelQueue:
        executor = self._executors.get(device)
        if executor is None:
            executor = self._executors[device] = ThreadPoolExecutor(1, thread_name_prefix=f"forward-{device}")
        queue = ModelQueue(name, score, policy, executor, self._observer)
        self.queues[name] = queue
        return queue

    def start(self) -> None:
        for q in self.queues.values():
            q.start()

    def close_intake(self) -> None:
        for q in self.queues.values():
            q.close_intake()

    @property
    def depth(self) -> int:
        """Items accepted and not yet scored, over all models."""
        return sum(q.depth for q in self.queues.values())

    async def stop(self, drain: bool = True) -> None:
        await asyncio.gather(*(q.stop(drain) for q in self.queues.values()))
        for ex in self._executors.values():
            ex.shutdown(wait=False, cancel_futures=True)

    async def score(self, name: str, encoded: Sequence[Encoded]) -> list[float]:
        futures = self.queues[name].submit(encoded)
        try:
            return list(await asyncio.gather(*futures))
        except BaseException:
            for f in futures:  # the request failed or its caller left: drop its remaining work
                f.cancel()
            raise
