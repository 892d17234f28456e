"""Over real HTTP: a real uvicorn on 127.0.0.1 in a subprocess, driven by concurrent clients."""

from __future__ import annotations

import asyncio
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import httpx
import yaml

from clients.local import ServerProcess, free_port



class Server(ServerProcess):
    """A server subprocess on a free loopback port; ``kind`` 'service' (logand serve) or 'naive'."""

    def __init__(self, kind: str, model: dict[str, Any], workdir: Path, threads: int | None,
                 engine: dict[str, Any] | None = None) -> None:
        port = free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        if kind == "service":
            config = {
                "models": [{**model, "name": "m", "reference": {"type": "none"}}],
                "engine": {**(engine or {}), **({"threads": threads} if threads else {})},
                "server": {"host": "127.0.0.1", "port": port, "log_level": "warning"},
            }
            cfg_path = workdir / f"service-{port}.yaml"
            cfg_path.write_text(yaml.safe_dump(config))
            cmd = [sys.executable, "-m", "service", "serve", "--config", str(cfg_path)]
        else:
            cmd = [sys.executable, "-m", "service.bench.naive", "--model", model["path"],
                   "--backend", model.get("backend", "torch"), "--dtype", model.get("dtype", "float32"),
                   "--device", model.get("device", "cpu"), "--quantize", model.get("quantize", "none"),
                   "--port", str(port)]
            if model.get("max_length"):
                cmd += ["--max-length", str(model["max_length"])]
            if threads:
                cmd += ["--threads", str(threads)]
        super().__init__(cmd, port, workdir / f"{kind}-{port}.log")

    def rss(self) -> dict[str, float]:
        """Current and peak resident set size of the server process, MiB (Linux /proc)."""
        out = {}
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out["rss_mib" if key == "VmRSS" else "peak_rss_mib"] = round(int(value.split()[0]) / 1024, 1)
        except OSError:
            import psutil

            out["rss_mib"] = round(psutil.Process(self.proc.pid).memory_info().rss / 2**20, 1)
        return out


def bodies(items: Sequence[tuple[str, str]], per_request: int) -> list[dict[str, Any]]:
    # allow_truncation: long HH texts are cut as in-process (and as trainers' requests are)
    return [{"items": [{"prompt": p, "response": r} for p, r in items[i:i + per_request]], "models": ["m"],
             "allow_truncation": True} for i in range(0, len(items), per_request)]


def percentile(values: Sequence[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


async def _drive(url: str, reqs: Sequence[dict[str, Any]], concurrency: int,
                 on_done: Any = None) -> tuple[list[float], float]:
    latencies: list[float] = []
    it = iter(enumerate(reqs))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=httpx.Timeout(900.0)) as client:
        async def worker() -> None:
            for i, body in it:
                t0 = time.perf_counter()
                r = await client.post("/v1/score", json=body)
                latencies.append(time.perf_counter() - t0)
                if r.status_code != 200:
                    raise RuntimeError(f"request {i}: HTTP {r.status_code}: {r.text[:300]}")
                if on_done is not None:
                    on_done(len(latencies))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return latencies, time.perf_counter() - t0


def load(url: str, items: Sequence[tuple[str, str]], per_request: int, concurrency: int) -> dict[str, Any]:
    """Send ``items`` in requests of ``per_request`` items from ``concurrency`` clients at once."""
    reqs = bodies(items, per_request)
    latencies, wall = asyncio.run(_drive(url, reqs, concurrency))
    return {
        "items": len(items), "requests": len(reqs), "per_request": per_request, "concurrency": concurrency,
        "seconds": round(wall, 3), "items_per_s": round(len(items) / wall, 2),
        "p50_ms": round(1000 * statistics.median(latencies), 1), "p99_ms": round(1000 * percentile(latencies, 0.99), 1),
    }


def warm(url: str, items: Sequence[tuple[str, str]], n: int = 8) -> None:
    asyncio.run(_drive(url, bodies(list(items)[:n], 1), min(n, 8)))


def soak(server: Server, items: Sequence[tuple[str, str]], requests: int, concurrency: int = 64,
         seed: int = 0) -> dict[str, Any]:
    """``requests`` one-item requests of varied lengths (responses cut at random points); the
    server's RSS sampled at the start, every tenth of the way, and at the end."""
    rng = random.Random(seed)
    varied = []
    for k in range(requests):
        p, r = items[k % len(items)]
        words = r.split()
        varied.append((p, " ".join(words[: rng.randint(1, max(1, len(words)))])))
    warm(server.url, varied, 64)
    samples = [{"requests": 0, **server.rss()}]
    step = max(1, requests // 10)

    def sample(done: int) -> None:
        if done % step == 0:
            samples.append({"requests": done, **server.rss()})

    latencies, wall = asyncio.run(_drive(server.url, bodies(varied, 1), concurrency, sample))
    end = {"requests": requests, **server.rss()}
    if samples[-1]["requests"] != requests:
        samples.append(end)
    start, middle = samples[0], min(samples, key=lambda s: abs(s["requests"] - requests // 2))
    return {
        "requests": requests, "concurrency": concurrency, "seconds": round(wall, 1),
        "items_per_s": round(requests / wall, 2), "p50_ms": round(1000 * statistics.median(latencies), 1),
        "p99_ms": round(1000 * percentile(latencies, 0.99), 1),
        "rss_start_mib": start["rss_mib"], "rss_middle_mib": middle["rss_mib"], "rss_end_mib": end["rss_mib"],
        "peak_rss_mib": end.get("peak_rss_mib"),
        "growth_mib": round(end["rss_mib"] - start["rss_mib"], 1),
        "growth_second_half_mib": round(end["rss_mib"] - middle["rss_mib"], 1),
        "samples": samples,
    }
