"""Prometheus metrics, one registry per app (no module-level singletons)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    """Request-level counters for the API, and the engine's observer (see EngineObserver)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("logand_requests", "HTTP requests", ["route", "status"], registry=r)
        self.request_seconds = Histogram("logand_request_seconds", "request latency", ["route"],
                                         buckets=TIME_BUCKETS, registry=r)
        self.items = Counter("logand_items", "items scored", ["model"], registry=r)
        self.batches = Counter("logand_batches", "forward passes", ["model"], registry=r)
        self.batch_size = Histogram("logand_batch_size", "items per forward pass", ["model"],
                                    buckets=SIZE_BUCKETS, registry=r)
        self.tokens = Counter("logand_tokens", "real tokens scored", ["model"], registry=r)
        self.padded_tokens = Counter("logand_padded_tokens", "tokens computed incl. padding", ["model"], registry=r)
        self.forward_seconds = Histogram("logand_forward_seconds", "forward pass time", ["model"],
                                         buckets=TIME_BUCKETS, registry=r)
        self.queue_wait_seconds = Histogram("logand_queue_wait_seconds", "time an item waited for its batch",
                                            ["model"], buckets=TIME_BUCKETS, registry=r)
        self.queue_depth_gauge = Gauge("logand_queue_depth", "items waiting", ["model"], registry=r)
        self.ready = Gauge("logand_ready", "1 when models are loaded and warmed", registry=r)

    # EngineObserver
    def batch_done(self, model: str, size: int, tokens: int, padded: int, forward_s: float) -> None:
        self.items.labels(model).inc(size)
        self.batches.labels(model).inc()
        self.batch_size.labels(model).observe(size)
        self.tokens.labels(model).inc(tokens)
        self.padded_tokens.labels(model).inc(padded)
        self.forward_seconds.labels(model).observe(forward_s)

    def queue_wait(self, model: str, seconds: float) -> None:
        self.queue_wait_seconds.labels(model).observe(seconds)

    def queue_depth(self, model: str, depth: int) -> None:
        self.queue_depth_gauge.labels(model).set(depth)

    def render(self) -> bytes:
        return generate_latest(self.registry)
