"""``logand serve``'s HTTP server: uvicorn with a draining shutdown.

On SIGTERM (or SIGINT), in this order:

1. readiness turns false and every new request is refused with 503 + ``Retry-After`` (a load
   balancer stops routing here; a retrying client goes elsewhere or comes back);
2. requests already accepted run to completion, for at most ``server.drain_timeout_s``;
3. uvicorn closes its sockets and runs the lifespan shutdown (the engine drains its queues).

A second signal skips the wait.  After a clean drain the process exits 0 (uvicorn alone would
re-raise the signal and exit −15).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from types import FrameType
from typing import Any

import uvicorn

from .config import Settings

log = logging.getLogger("logand")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: Any, drain_timeout_s: float) -> None:
        super().__init__(config)
        self.app = app
        self.drain_timeout_s = drain_timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain: asyncio.Task[None] | None = None

    async def serve(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain is not None or self._loop is None or not self.app.state.service.ready:
            # Second signal, or not serving yet: uvicorn's own behaviour (exit now).
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True
            return
        self._loop.call_soon_threadsafe(self._start_drain, signal.Signals(sig).name)

    def _start_drain(self, name: str) -> None:
        if self._drain is None:
            self._drain = asyncio.ensure_future(self._drain_then_exit(name))

    async def _drain_then_exit(self, name: str) -> None:
        app = self.app
        service = app.state.service
        service.begin_drain()
        started = time.monotonic()
        log.info("%s: draining (not ready; new requests get 503); %d request(s) and %d item(s) in flight",
                 name, app.state.inflight, service.engine.depth)
        while app.state.inflight > 0 and time.monotonic() - started < self.drain_timeout_s:
            await asyncio.sleep(0.02)
        if app.state.inflight:
            log.warning("drain timeout (%.0fs): %d request(s) still running are cut off", self.drain_timeout_s,
                        app.state.inflight)
        else:
            log.info("drained in %.2fs; shutting down", time.monotonic() - started)
        self.should_exit = True


def serve(app: Any, settings: Settings) -> None:
    s = settings.server
    config = uvicorn.Config(app, host=s.host, port=s.port, log_level=s.log_level, access_log=False,
                            timeout_graceful_shutdown=int(settings.engine.batch_timeout_s) + 5,
                            timeout_keep_alive=int(s.keep_alive_s))
    DrainingServer(config, app, s.drain_timeout_s).run()
