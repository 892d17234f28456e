"""A logand service of one's own: ``logand serve`` in a subprocess on a free loopback port.

Used by commands that accept ``--service local`` (fit-reference, sample, the experiments), so
one command line runs a whole experiment, and by the test suite (the path a user takes)::

    with LocalService(config=None) as svc:   # the embedded default models
        RewardClient(svc.url).score(...)

The server's output goes to ``log_path`` (a temporary file unless given); start-up failures
raise with that log attached.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import httpx

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self from Python 3.11


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_process(proc: subprocess.Popen, log: Any = None, grace_s: float = 30) -> int:
    """SIGTERM, then SIGKILL after ``grace_s``; closes the process's log file.  Its exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if log is not None:
        log.close()
    return int(proc.returncode)


class ServerProcess:
    """A server subprocess (``cmd``) answering on ``port`` of 127.0.0.1, its output in ``log_path``.

    ``wait_ready`` polls ``/ready``; used as a context manager it waits, and stops the process on
    the way out (or when it never became ready)."""

    def __init__(self, cmd: list[str], port: int, log_path: str | Path | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{self.port}"
        if log_path is None:
            fd, name = tempfile.mkstemp(prefix="logand-serve-", suffix=".log")
            os.close(fd)
            log_path = name
        self.log_path = Path(log_path)
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})}, cwd=Path(__file__).resolve().parent.parent)

    def wait_ready(self, timeout: float = 300.0, headers: dict[str, str] | None = None) -> Self:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                if httpx.get(self.url + "/ready", timeout=2, headers=headers).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready after {timeout}s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        return stop_process(self.proc, self._log)

    def __enter__(self) -> Self:
        try:
            return self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


class LocalService(ServerProcess):
    def __init__(self, config: str | Path | None = None, log_path: str | Path | None = None,
                 env: dict[str, str] | None = None, port: int | None = None) -> None:
        port = port or free_port()
        cmd = [sys.executable, "-m", "service", "serve", "--host", "127.0.0.1", "--port", str(port)]
        if config is not None:
            cmd += ["--config", str(config)]
        super().__init__(cmd, port, log_path, env)


@contextlib.contextmanager
def service_url(spec: str, config: str | Path | None = None, api_key: str | None = None) -> Iterator[str]:
    """``spec`` itself, or — for ``"local"`` — the URL of a service started for the block
    (``api_key``: the key it requires, if its config or environment sets one)."""
    if spec != "local":
        yield spec
        return
    print("starting a local logand service" + (f" with {config}" if config else " (embedded default models)"),
          file=sys.stderr)
    svc = LocalService(config)
    try:
        svc.wait_ready(headers={"Authorization": f"Bearer {api_key}"} if api_key else None)
        yield svc.url
    finally:
        svc.stop()
