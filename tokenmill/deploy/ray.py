"""tokenmill on Ray Serve: every Ray replica runs tokenmill's own app -- engine, runner, admission,
deadlines, the OpenAI routes and SSE -- and Ray routes HTTP traffic between replicas and machines.

    tokenmill ray-serve --num-replicas 2 --mode batch --port 8000        # CLI
    serve run tokenmill.deploy.ray:app_builder num_replicas=2 mode=batch # Ray's own CLI

Backpressure is shared, not duplicated: Ray sends a replica at most `max_ongoing_requests` =
tokenmill's capacity at once (so it routes around a full replica instead of queueing behind it),
and its own queue is bounded by `max_queued_requests` = tokenmill's queue limit x replicas, past
which Ray answers 503. A replica's own admission still refuses whatever slips past (503 +
Retry-After). Shutdown: Ray stops routing to a replica, waits up to `graceful_shutdown_timeout_s`
(= --drain-timeout) for its streams to finish, then runs the app's shutdown, which ends any stream
still running with an error event before [DONE].
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ray import serve
from starlette.types import ASGIApp, Receive, Scope, Send

from tokenmill.config import Settings

REPLICA_HEADER = b"x-tokenmill-replica"


@dataclass(frozen=True, slots=True)
class RayOptions:
    num_replicas: int = 1
    autoscale_min: int | None = None  # both set: Ray autoscales on ongoing requests instead
    autoscale_max: int | None = None
    cpus_per_replica: float | None = None  # default: --threads, else 1

    @property
    def autoscaling(self) -> bool:
        return self.autoscale_min is not None and self.autoscale_max is not None


def deployment_options(settings: Settings, options: RayOptions) -> dict[str, Any]:
    """Ray Serve deployment options derived from tokenmill's settings (see the module docstring)."""
    capacity = settings.capacity()
    most_replicas = (options.autoscale_max or options.num_replicas) if options.autoscaling else options.num_replicas
    result: dict[str, Any] = {
        "name": "tokenmill",
        "max_ongoing_requests": capacity,
        "max_queued_requests": settings.queue_limit() * most_replicas,
        "graceful_shutdown_timeout_s": settings.drain_timeout,
        "graceful_shutdown_wait_loop_s": 0.5,
        "health_check_period_s": 5.0,
        "ray_actor_options": {"num_cpus": options.cpus_per_replica or settings.threads or 1},
    }
    if options.autoscaling:
        result["autoscaling_config"] = {
            "min_replicas": options.autoscale_min,
            "max_replicas": options.autoscale_max,
            # scale out before a replica is full: a full replica means requests wait in Ray's queue
            "target_ongoing_requests": max(1.0, 0.75 * capacity),
        }
    else:
        result["num_replicas"] = options.num_replicas
    return result


@serve.ingress()
class TokenmillReplica:
    """One Ray replica: tokenmill's whole app, built on the replica from plain settings."""

    def __init__(self, settings: dict[str, Any]):
        self._settings = Settings(**settings)
        self._lifecycle = None

    def __serve_build_asgi_app__(self) -> ASGIApp:
        from tokenmill.server import create_app

        app = create_app(self._settings, freeze_heap=self._settings.gc_freeze)
        self._lifecycle = app.state.serving.lifecycle
        return _ReplicaTag(app, _replica_name())

    def check_health(self) -> None:
        """Ray restarts a replica whose check raises: one that is up but not serving."""
        if self._lifecycle is not None and not self._lifecycle.ready and not self._lifecycle.draining:
            raise RuntimeError("tokenmill replica is not ready")


def build_application(settings: Settings, options: RayOptions = RayOptions()):
    fields = settings.model_dump(exclude_unset=False)
    deployment: Any = serve.deployment(TokenmillReplica)  # Ray's stubs type only the decorator form
    return deployment.options(**deployment_options(settings, options)).bind(fields)


def app_builder(args: dict[str, str]):
    """For `serve run tokenmill.deploy.ray:app_builder key=value ...` (keys are Settings fields,
    plus num_replicas, autoscale_min, autoscale_max, cpus_per_replica)."""
    ray_keys = {
        f: args.pop(f) for f in ("num_replicas", "autoscale_min", "autoscale_max", "cpus_per_replica") if f in args
    }
    options = RayOptions(**{k: (float(v) if k == "cpus_per_replica" else int(v)) for k, v in ray_keys.items()})  # type: ignore[arg-type]  # parsed per field
    return build_application(Settings(**args), options)  # type: ignore[arg-type]  # pydantic parses the strings


def _replica_name() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 -- outside Ray (tests of the app itself): the process is the replica
        return str(os.getpid())


class _ReplicaTag:
    """Adds `x-tokenmill-replica` to every response, so load spreading can be seen from outside."""

    def __init__(self, app: ASGIApp, name: str):
        self._app = app
        self._name = name.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return

        async def tagged(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (REPLICA_HEADER, self._name)]}
            await send(message)

        await self._app(scope, receive, tagged)


def run(settings: Settings, options: RayOptions, address: str | None = None) -> int:
    """`tokenmill ray-serve`: start (or join, with `address`) a Ray cluster, deploy, serve until
    SIGTERM/SIGINT, then shut Serve down gracefully (each replica drains, see above)."""
    import signal
    import threading

    import ray

    ray.init(address=address, include_dashboard=False)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(build_application(settings, options), name="tokenmill", route_prefix="/")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(f"tokenmill on Ray Serve: http://{settings.host}:{settings.port}/v1 (Ctrl-C or SIGTERM to stop)", flush=True)
    stop.wait()
    serve.shutdown()
    ray.shutdown()
    return 0
