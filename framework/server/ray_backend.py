"""serve.backend=ray: the app of `diffstage serve` as a Ray Serve deployment of serve.replicas replicas (or as
many as serve.ray.autoscaling_config decides), behind Ray Serve's HTTP proxy on serve.host:serve.port.

Each replica is a whole server: its own ServerState (models, batching queue, metrics, video jobs) built in the
replica from the run config and settings the driver checked, and the same FastAPI app as serve.backend=uvicorn
(endpoints, API key, errors). The files `url` answers link to are kept once for all (SharedFiles), so a link
works whichever replica its GET reaches. Answers carry X-Diffstage-Replica, the replica's Ray Serve tag. Torch in
a replica uses as many threads as the CPUs Ray gave it (ray_actor_options.num_cpus; by default an equal share of
the cluster's), so replicas on one machine do not oversubscribe its cores.

Ray is imported by this module alone, which is loaded for serve.backend=ray only."""
from __future__ import annotations

import inspect
import logging
import os
import sys
import threading
from typing import Any

import ray
from ray import serve

from ..errors import DiffstageError, did_you_mean, shown
from ..run_config import RunConfig
from .app import create_app
from .media import FileStore
from .settings import ServeSettings
from .state import ServerState

APP_NAME = "diffstage"
REPLICA_HEADER = "X-Diffstage-Replica"
# Deployment.options() arguments serve.ray may not set: the name is ours, the replica count is serve.replicas
_NOT_OURS = {"self", "func_or_class", "name", "version", "num_replicas", "_init_args", "_init_kwargs", "_internal"}


class ReplicaHeader:
    """ASGI middleware: every answer says which replica gave it."""

    def __init__(self, app, replica: str):
        self.app, self.header = app, (REPLICA_HEADER.lower().encode(), replica.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def sending(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, sending)


@ray.remote(num_cpus=0)
class SharedFiles:
    """The files `url` answers link to, kept for every replica: a link one replica made works whichever replica
    the proxy sends its GET to."""

    def __init__(self, ttl_s: float):
        self.store = FileStore(ttl_s)

    def put(self, data: bytes, media_type: str, suffix: str) -> str:
        return self.store.put(data, media_type, suffix)

    def get(self, file_id: str) -> tuple[bytes, str] | None:
        return self.store.get(file_id)


class RemoteFiles:
    """FileStore's interface over SharedFiles (the server calls it off its event loop)."""

    def __init__(self, actor):
        self.actor = actor

    def put(self, data: bytes, media_type: str, suffix: str) -> str:
        return ray.get(self.actor.put.remote(data, media_type, suffix))

    def get(self, file_id: str) -> tuple[bytes, str] | None:
        return ray.get(self.actor.get.remote(file_id))


@serve.ingress()
class Replica:
    """One replica: a ServerState of its own, its app built once the replica runs (Ray Serve's late-bound
    ingress), so nothing of the models is pickled."""

    def __init__(self, run: RunConfig, settings: ServeSettings, threads: int, files):
        import torch

        torch.set_num_threads(threads)
        _replica_logging()
        self.state = ServerState(run, settings)
        self.state.files = RemoteFiles(files)
        self.tag = serve.get_replica_context().replica_tag
        if settings.preload:  # loaded before Ray routes a request here (so /ready is 200 on every replica)
            self.state.preload()
            self.state.preloading.join()
            if self.state.preload_error is not None:
                raise self.state.preload_error

    def __serve_build_asgi_app__(self):
        app = create_app(self.state)
        app.add_middleware(ReplicaHeader, replica=self.tag)
        return app


def _replica_logging() -> None:
    """The server's log lines (one JSON line per request) on the replica's stderr, which Ray keeps in its logs
    and shows on the driver's console."""
    logger = logging.getLogger("diffstage")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def start_ray(settings: ServeSettings) -> bool:
    """ray.init(**serve.ray_init) unless Ray runs in this process already; True when this call started it.
    A Ray started here (no address given) has no dashboard: one process less, nothing more listening."""
    if ray.is_initialized():
        return False
    options = dict(settings.ray_init or {})
    if "address" not in options and not os.environ.get("RAY_ADDRESS"):
        options.setdefault("include_dashboard", False)
    try:
        ray.init(**options)
    except (TypeError, ValueError, ConnectionError, RuntimeError) as e:  # bad arguments, no cluster at `address`
        raise DiffstageError(f"serve.ray_init: ray.init({shown(options)}) failed: {e}") from None
    return True


def _cluster_cpus() -> float:
    """The CPUs one replica may get at most: the largest node's (a replica runs on one node)."""
    nodes = [n.get("Resources", {}).get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
    return max(nodes or [os.cpu_count() or 1])


def check_video_models(video_models: list[str], settings: ServeSettings) -> None:
    """Video jobs live in the replica that runs them (GET /v1/videos/{id} through the proxy may reach another):
    a video model is served by one replica only."""
    several = (settings.replicas or 1) > 1 or (settings.ray or {}).get("autoscaling_config") is not None
    if video_models and several:
        raise DiffstageError(f"serve.backend=ray serves video models ({', '.join(video_models)}) with one replica "
                             "only: a video job lives in the replica that runs it, and the proxy may send the "
                             "requests that poll it to another; set serve.replicas=1 (no autoscaling_config), or "
                             "serve the video models from a server of their own")


def deployment_options(settings: ServeSettings, cpus: float) -> dict[str, Any]:
    """Ray Serve deployment options from serve.replicas and serve.ray; each replica gets an equal share of
    `cpus` unless serve.ray.ray_actor_options.num_cpus says otherwise."""
    options = dict(settings.ray or {})
    allowed = set(inspect.signature(serve.Deployment.options).parameters) - _NOT_OURS
    unknown = sorted(set(options) - allowed)
    if unknown:
        hint = did_you_mean(unknown[0], allowed)
        raise DiffstageError(f"serve.ray: unknown Ray Serve deployment option '{unknown[0]}'"
                             + (f" ({hint})" if hint else f"; known: {', '.join(sorted(allowed))}"))
    autoscaling = options.get("autoscaling_config")
    if autoscaling is None:
        options["num_replicas"] = settings.replicas or 1
    replicas = options.get("num_replicas") or (autoscaling or {}).get("max_replicas") or 1
    actor = dict(options.get("ray_actor_options") or {})
    actor.setdefault("num_cpus", cpus / replicas)  # a fraction when replicas outnumber the CPUs: still placeable
    options["ray_actor_options"] = actor
    # a replica takes as many requests as its own queue and batch hold: its 429 (serve.queue_size) still applies
    options.setdefault("max_ongoing_requests", settings.queue_size + settings.max_batch)
    options.setdefault("graceful_shutdown_timeout_s", settings.shutdown_grace_s + 5)
    options.setdefault("graceful_shutdown_wait_loop_s", 0.5)
    options.setdefault("max_constructor_retry_count", 1)  # a model that cannot load fails at once, not 20 times
    return options


def deploy(run: RunConfig, settings: ServeSettings) -> str:
    """Start Serve's proxy on serve.host:serve.port and deploy the replicas (Ray must be running: start_ray);
    returns the URL once every replica runs, its models loaded (serve.preload)."""
    options = deployment_options(settings, _cluster_cpus())
    threads = max(1, int(options["ray_actor_options"]["num_cpus"]))
    try:
        deployment = serve.deployment(Replica, name=APP_NAME).options(**options)
    except (TypeError, ValueError) as e:  # Ray's own checks of the options (pydantic errors are ValueErrors)
        raise DiffstageError(f"serve.ray: Ray Serve refused the deployment options {shown(settings.ray)}: {e}") \
            from None
    serve.start(http_options={"host": settings.host, "port": settings.port})
    if APP_NAME in serve.status().applications:  # on a cluster this joined: serve.run would replace it
        raise DiffstageError(f"Ray Serve already runs an application named '{APP_NAME}' on this cluster; stop it "
                             f"first (serve.delete('{APP_NAME}')), or serve from a Ray of this command's own")
    app = deployment.bind(run, settings, threads, SharedFiles.remote(settings.url_ttl_s))
    try:
        serve.run(app, name=APP_NAME, route_prefix="/")
    except Exception as e:  # noqa: BLE001 - Ray's deployment failure (a replica could not start): its reason
        raise DiffstageError(f"the Ray Serve deployment failed: {e}") from None
    return f"http://{settings.host}:{settings.port}"


def stop(stop_ray: bool, timeout_s: float) -> bool:
    """Delete the deployment (each replica finishes its running requests within its grace, as on SIGTERM with
    uvicorn); then, when `stop_ray` (this process started Ray), Serve's proxy and Ray itself: on a cluster this
    joined, other applications keep running. False when the deletion did not end within `timeout_s`: Ray's own
    processes were stopped meanwhile (a SIGTERM sent to the whole process group reaches them too), and nothing
    is left to delete."""
    def delete():
        serve.delete(APP_NAME)  # first, while the proxy still passes the running requests' answers on
        if stop_ray:
            serve.shutdown()

    deleting = threading.Thread(target=delete, name="diffstage-ray-shutdown", daemon=True)
    deleting.start()
    deleting.join(timeout_s)
    if stop_ray:
        ray.shutdown()
    return not deleting.is_alive()
