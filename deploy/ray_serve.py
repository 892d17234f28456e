"""logand on Ray Serve: the same FastAPI app (``service.api.create_app``), N replicas behind
Ray's HTTP proxy.

    serve run deploy.ray_serve:build_app config=/etc/logand/config.yaml num_gpus=1 \
        min_replicas=1 max_replicas=4

or, from Python::

    from deploy.ray_serve import RayServeOptions, build
    serve.run(build(RayServeOptions(config="my.yaml", min_replicas=2, max_replicas=2)))

How the pieces map:

* each replica is one ``LogandReplica`` actor holding one copy of the app; the app's lifespan
  (load every model, warm up, start the batcher) runs inside the replica when Ray initialises it
  (Ray runs the ASGI lifespan of an ingress deployment), and the replica is not RUNNING until
  ``check_health`` passes, i.e. until the models are loaded and warmed;
* ``num_gpus`` per replica (``ray_actor_options``); 0 on CPU, where ``num_cpus`` is the
  engine's thread count, so Ray never packs more replicas on a node than it has cores for;
* ``autoscaling_config`` scales between ``min_replicas`` and ``max_replicas`` on ongoing
  requests per replica;
* backpressure: a replica takes at most ``max_ongoing_requests`` at once (enough for the batcher
  to fill batches across requests, since batching across requests is where throughput comes
  from); beyond that the router queues ``max_queued_requests`` more and then rejects with
  **429 and Retry-After** (Ray's ``BackpressureConfig``), the status and header the service
  itself sends when a model queue is full; a deployment with no live replica answers 503.
  Both are retried by ``clients.RewardClient``;
* a replica that dies mid-request: Ray's proxy ends such a request without any response, which
  uvicorn turns into a bare 500 that no client retries.  ``proxy_middlewares`` (installed on the
  proxy with ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=deploy.ray_serve:proxy_middlewares``
  in the environment of ``ray start``; ``python -m deploy.ray_serve`` sets it) answers exactly
  those requests 503 with Retry-After instead, in the service's error format, so the client
  retries them on a live replica.  Every response the app itself sends passes unchanged;
* ``check_health`` fails while the service is not ready (loading, draining) or a backend reports
  itself unhealthy: Ray then replaces the replica;
* ``graceful_shutdown_timeout_s`` is longer than ``engine.batch_timeout_s``, so a replica being
  stopped finishes (drains) the batches it accepted.

Model paths in the config must resolve on every node (``pkg:`` paths of an installed package,
or a shared filesystem); the config is read and validated once, on the driver, so a bad file
fails before anything is deployed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Sequence

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve
from ray.serve import Application
from ray.serve.config import AutoscalingConfig, BackpressureConfig
from starlette.middleware import Middleware

from service.api import create_app
from service.api.middleware import ResponseTracker, send_error
from service.config import Settings, load_settings

PROXY_CALLBACK = "deploy.ray_serve:proxy_middlewares"


class ReplicaLossAs503:
    """Ray proxy middleware: a request the proxy ends without a response becomes 503 + Retry-After.

    The proxy sends nothing when the replica handling a request died (``RayActorError``) or the
    request failed inside Ray before reaching the app; uvicorn would answer a bare 500.  The
    service is then briefly short of capacity, which is what 503 + Retry-After says, and
    scoring is idempotent, so the client's retry is safe.
    """

    def __init__(self, app: Any, retry_after_s: int = 1) -> None:
        self.app = app
        self.retry_after_s = retry_after_s

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        tracker = ResponseTracker(send)
        await self.app(scope, receive, tracker)
        if not tracker.started:
            await send_error(send, 503, "replica_unavailable",
                             "the replica serving this request stopped before answering; retry",
                             [(b"retry-after", str(self.retry_after_s).encode())])


def proxy_middlewares() -> list[Middleware]:
    """Ray's HTTP proxy callback (``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``)."""
    return [Middleware(ReplicaLossAs503)]


class ServiceNotHealthy(RuntimeError):
    """Raised by ``check_health`` so Ray marks the replica unhealthy and replaces it."""


class RayServeOptions(BaseModel):
    """Arguments of the application builder (``serve run deploy.ray_serve:build_app key=value …``)."""

    model_config = ConfigDict(extra="forbid")

    config: str | None = Field(None, description="logand YAML config (default: the embedded default models)")
    name: str = Field("logand", description="deployment name")
    num_gpus: float = Field(0, ge=0, description="GPUs per replica (0: CPU replicas)")
    num_cpus: float | None = Field(None, gt=0, description="CPUs per replica (default: engine.threads, else 1)")
    min_replicas: int = Field(1, ge=1, description="autoscaling floor")
    max_replicas: int = Field(4, ge=1, description="autoscaling ceiling")
    initial_replicas: int | None = Field(None, ge=1, description="replicas at start (default: min_replicas)")
    target_ongoing_requests: float = Field(
        16, gt=0, description="ongoing requests per replica the autoscaler aims for")
    max_ongoing_requests: int = Field(
        64, ge=1, description="requests one replica works on at once; its batcher batches across them")
    max_queued_requests: int = Field(
        256, ge=-1, description="requests waiting for a replica before 429 (-1: unbounded)")
    health_check_period_s: float = Field(5, gt=0, description="how often Ray calls check_health")
    health_check_timeout_s: float = Field(10, gt=0, description="check_health time limit")

    @model_validator(mode="after")
    def _bounds(self) -> "RayServeOptions":
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) is below min_replicas ({self.min_replicas})")
        return self


@serve.ingress()
class LogandReplica:
    """One replica: one app built from ``settings``, its models loaded by the app's lifespan."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.logand_app: FastAPI | None = None  # (Ray's wrapper owns the name ``app``)

    def __serve_build_asgi_app__(self) -> FastAPI:
        # Built here, inside the replica, never on the driver: nothing heavy is pickled, and Ray
        # runs this app's lifespan (model loading) right after.
        self.logand_app = create_app(self.settings)
        return self.logand_app

    async def check_health(self) -> None:
        if self.logand_app is None:
            raise ServiceNotHealthy("the app is not built yet")
        service = self.logand_app.state.service
        if not service.ready:
            raise ServiceNotHealthy("shutting down" if service.draining else "models are not loaded")
        bad = [name for name, handle in service.models.items() if not handle.backend.health()]
        if bad:
            raise ServiceNotHealthy(f"unhealthy backend(s): {', '.join(bad)}")


def build(options: RayServeOptions, settings: Settings | None = None) -> Application:
    """The Ray Serve application: ``LogandReplica`` with options derived from the service config."""
    if settings is None:
        settings = load_settings(options.config)
    num_cpus = options.num_cpus or float(settings.engine.threads or 1)
    # A replica being stopped drains what it accepted: let its longest batch finish.
    grace = settings.engine.batch_timeout_s + 10
    deployment = serve.deployment(
        LogandReplica,
        name=options.name,
        ray_actor_options={"num_gpus": options.num_gpus, "num_cpus": num_cpus},
        autoscaling_config=AutoscalingConfig(
            min_replicas=options.min_replicas,
            max_replicas=options.max_replicas,
            initial_replicas=options.initial_replicas,
            target_ongoing_requests=options.target_ongoing_requests,
        ),
        max_ongoing_requests=options.max_ongoing_requests,
        max_queued_requests=options.max_queued_requests,
        backpressure_config=BackpressureConfig(status_code=429, retry_after_s=settings.engine.retry_after_s),
        health_check_period_s=options.health_check_period_s,
        health_check_timeout_s=options.health_check_timeout_s,
        graceful_shutdown_timeout_s=grace,
        # A model that cannot load fails the deployment after a few tries, not after twenty.
        max_constructor_retry_count=3,
    )
    return deployment.bind(settings)


def build_app(args: dict[str, Any]) -> Application:
    """Application builder for ``serve run deploy.ray_serve:build_app key=value …``."""
    return build(RayServeOptions.model_validate(args))


def ray_environment(env: dict[str, str] | None = None) -> dict[str, str]:
    """Variables for the processes of a Ray cluster (``ray start`` or ``ray.init``): its workers
    import ``deploy`` from this checkout, and its HTTP proxy installs ``proxy_middlewares``."""
    env = dict(os.environ if env is None else env)
    root = str(Path(__file__).resolve().parent.parent)
    paths = [root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]
    return {"PYTHONPATH": os.pathsep.join(paths), "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": PROXY_CALLBACK}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m deploy.ray_serve``: start (or join) Ray, deploy, serve until SIGINT/SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m deploy.ray_serve", description=main.__doc__)
    parser.add_argument("--address", default=None,
                        help="Ray cluster to join (default: start a local one; a joined cluster's "
                             "`ray start` needs the variables of `--print-env`)")
    parser.add_argument("--host", default="127.0.0.1", help="proxy bind address (0.0.0.0 in a container)")
    parser.add_argument("--port", type=int, default=8000, help="proxy port")
    parser.add_argument("--print-env", action="store_true", help="print the variables `ray start` needs, then exit")
    for name, field in RayServeOptions.model_fields.items():
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, default=None, help=field.description)
    args = parser.parse_args(argv)
    if args.print_env:
        for key, value in ray_environment().items():
            print(f"export {key}={value}")
        return 0
    given = {k: getattr(args, k) for k in RayServeOptions.model_fields if getattr(args, k) is not None}
    options = RayServeOptions.model_validate(given)
    application = build(options)  # validates the config before Ray starts
    import ray

    os.environ.update(ray_environment())  # inherited by the local cluster's processes
    ray.init(address=args.address, include_dashboard=False)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(application, name=options.name, route_prefix="/")
    print(json.dumps({"url": f"http://{args.host}:{args.port}", "deployment": options.name}), flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
