"""The batcher on a deterministic score function: batching, ordering, failures, admission."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import pytest

from service.engine import BatchPolicy, Engine, ModelQueue, plan_batch
from service.errors import BackendFailure, BatchTimeout, NonFiniteScore, NotReady, Overloaded
from service.formatting import Encoded


def enc(n: int, tag: int = 0) -> Encoded:
    return Encoded(input_ids=[tag] * n, token_type_ids=None, truncated=0, response_truncated=False)


class Recorder:
    """Scores an item as its length + tag/1000, and records every batch it saw."""

    def __init__(self, delay: float = 0.0) -> None:
        self.batches: list[list[int]] = []
        self.delay = delay
        self.threads: set[str] = set()

    def __call__(self, batch: Sequence[Encoded]) -> list[float]:
        self.threads.add(threading.current_thread().name)
        self.batches.append([len(e) for e in batch])
        if self.delay:
            time.sleep(self.delay)
        return [len(e) + e.input_ids[0] / 1000 for e in batch]


def test_plan_batch_keeps_oldest_and_respects_budgets() -> None:
    policy = BatchPolicy(max_batch_tokens=40, max_batch_size=3, min_fill=0.0)
    lengths = [10, 3, 11, 9, 30, 10]
    chosen = plan_batch(lengths, policy)
    assert 0 in chosen
    assert len(chosen) <= 3
    assert max(lengths[i] for i in chosen) * len(chosen) <= 40
    assert chosen == sorted(chosen)
    assert sorted(lengths[i] for i in chosen) == [9, 10, 10]  # nearest lengths to the anchor


def test_plan_batch_min_fill_builds_near_exact_length_buckets() -> None:
    lengths = [100, 20, 101, 99, 50, 100]
    chosen = plan_batch(lengths, BatchPolicy(max_batch_tokens=10_000, max_batch_size=64, min_fill=0.95))
    assert sorted(lengths[i] for i in chosen) == [99, 100, 100, 101]
    everything = plan_batch(lengths, BatchPolicy(max_batch_tokens=10_000, max_batch_size=64, min_fill=0.0))
    assert everything == list(range(6))


def test_plan_batch_single_oversized_item_still_runs() -> None:
    assert plan_batch([500, 1, 1], BatchPolicy(max_batch_tokens=64, max_batch_size=8)) == [0]


async def make_queue(score, **policy) -> ModelQueue:
    q = ModelQueue("m", score, BatchPolicy(**{"max_wait_s": 0.005, **policy}), ThreadPoolExecutor(1))
    q.start()
    return q


async def test_results_come_back_in_item_order_and_batched_across_requests() -> None:
    rec = Recorder(delay=0.02)
    engine = Engine()
    engine.add("m", rec, BatchPolicy(max_wait_s=0.01), "cpu")
    engine.start()
    requests = [[enc(5 + (i * 7) % 13, tag=i) for i in range(k, k + 4)] for k in range(0, 40, 4)]
    results = await asyncio.gather(*(engine.score("m", r) for r in requests))
    await engine.stop()
    for req, res in zip(requests, results):
        assert res == [len(e) + e.input_ids[0] / 1000 for e in req]
    assert sum(len(b) for b in rec.batches) == 40
    assert len(rec.batches) < 10  # requests were merged into shared batches
    assert all(t.startswith("forward-") for t in rec.threads)  # never on the event loop


async def test_backend_exception_fails_exactly_its_batch_and_next_batch_runs() -> None:
    calls = {"n": 0}

    def flaky(batch: Sequence[Encoded]) -> list[float]:
        calls["n"] += 1
        if any(e.input_ids[0] == 666 for e in batch):
            raise RuntimeError("boom")
        return [1.0] * len(batch)

    q = await make_queue(flaky, min_fill=0.99)
    bad = q.submit([enc(7, 666)])
    good = q.submit([enc(30, 1)])  # a different length: its own batch under min_fill 0.99
    with pytest.raises(BackendFailure, match="boom"):
        await bad[0]
    assert await good[0] == 1.0
    assert await q.submit([enc(7, 2)])[0] == 1.0
    await q.stop()


async def test_non_finite_score_fails_only_its_item() -> None:
    def score(batch: Sequence[Encoded]) -> list[float]:
        return [math.nan if e.input_ids[0] == 1 else 2.0 for e in batch]

    q = await make_queue(score)
    futures = q.submit([enc(4, 0), enc(4, 1), enc(4, 2)])
    results = await asyncio.gather(*futures, return_exceptions=True)
    await q.stop()
    assert results[0] == 2.0 and results[2] == 2.0
    assert isinstance(results[1], NonFiniteScore)


async def test_full_queue_answers_at_once_and_accepts_all_or_nothing() -> None:
    rec = Recorder(delay=0.05)
    q = await make_queue(rec, max_queue_items=5)
    first = q.submit([enc(3) for _ in range(4)])
    with pytest.raises(Overloaded) as exc:
        q.submit([enc(3) for _ in range(2)])
    assert exc.value.retry_after >= 1
    await asyncio.gather(*first)
    await q.stop()
    assert sum(len(b) for b in rec.batches) == 4  # the refused request left nothing behind


async def test_hung_batch_times_out_and_later_batches_still_run() -> None:
    def slow(batch: Sequence[Encoded]) -> list[float]:
        if batch[0].input_ids[0] == 9:
            time.sleep(0.3)
        return [0.5] * len(batch)

    q = await make_queue(slow, batch_timeout_s=0.1, min_fill=0.99)
    hung = q.submit([enc(3, 9)])
    with pytest.raises(BatchTimeout):
        await hung[0]
    assert await q.submit([enc(40, 1)])[0] == 0.5
    await q.stop()


async def test_cancelled_callers_are_skipped() -> None:
    rec = Recorder(delay=0.05)
    q = await make_queue(rec, min_fill=0.99)
    blocker = q.submit([enc(50)])
    await asyncio.sleep(0.01)  # the blocker is now in the worker thread
    gone = q.submit([enc(7, 1) for _ in range(3)])
    for f in gone:
        f.cancel()
    kept = q.submit([enc(9, 2)])
    await blocker[0]
    assert await kept[0] == 9.002
    await q.stop()
    assert [7, 7, 7] not in rec.batches and all(7 not in b for b in rec.batches)


async def test_stop_drains_accepted_work_and_refuses_new() -> None:
    q = await make_queue(Recorder(delay=0.02))
    futures = q.submit([enc(i + 1) for i in range(6)])
    stopping = asyncio.create_task(q.stop(drain=True))
    await asyncio.sleep(0)
    with pytest.raises(NotReady):
        q.submit([enc(2)])
    await stopping
    assert [f.result() for f in futures] == [float(i + 1) for i in range(6)]
