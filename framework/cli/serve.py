"""`diffstage serve`: the OpenAI-compatible server (diffstage/server/), a Hydra app like `diffstage generate`:
model=, runtime, cache, parallel and overrides mean the same; serve.* sets the server (conf/serve.yaml)."""
from __future__ import annotations

import contextlib
import logging
import signal
import threading

from ..errors import DiffstageError
from .exits import fail
from .hydra_app import HydraJob, rank_app

log = logging.getLogger("diffstage.server")


def serve_command(argv: list[str]) -> None:
    rank_app(_serve_task, "serve", argv, "serve")


def _serve_task(cfg, job: HydraJob) -> None:
    try:
        from omegaconf import OmegaConf

        from ..run_config import parse_run_config
        from ..server import ServerState, serve_settings

        plain = OmegaConf.to_container(cfg, resolve=False)
        settings = serve_settings(plain.pop("serve", None))
        run = parse_run_config(OmegaConf.create(plain))
        state = ServerState(run, settings) if settings.backend != "ray" else None
    except ImportError as e:
        fail(DiffstageError(f"diffstage serve needs the serve extra: pip install 'diffstage[serve]' ({e})"))
        return
    except DiffstageError as e:
        fail(e)
        return
    if state is not None:
        run_server(state)
        return
    try:
        serve_on_ray(run, settings)
    except DiffstageError as e:
        fail(e)


def serve_on_ray(run, settings) -> None:
    """serve.backend=ray: the replicas on Ray Serve (diffstage/server/ray_backend.py) until SIGINT/SIGTERM, then
    the deployment deleted (running requests finish within serve.shutdown_grace_s) and the Ray this started
    stopped."""
    from ..server.pool import ModelPool

    pool = ModelPool(run, settings.models, settings.memory_budget_gb)  # every model checked before Ray starts
    try:
        from ..server import ray_backend
    except ImportError as e:
        raise DiffstageError("diffstage serve serve.backend=ray needs the ray extra: pip install 'diffstage[ray]' "
                             f"({e})") from None
    ray_backend.check_video_models([n for n, m in pool.models.items() if m.makes_videos], settings)
    names = pool.names()
    started = ray_backend.start_ray(settings)
    stop = threading.Event()
    # after ray.init, which sets a SIGTERM handler of its own
    handled = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        url = ray_backend.deploy(run, settings)
        scaling = "autoscaling" if (settings.ray or {}).get("autoscaling_config") else \
            f"{settings.replicas or 1} replica{'s' if (settings.replicas or 1) > 1 else ''}"
        log.info("serving %s on %s (Ray Serve, %s)", ", ".join(names), url, scaling)
        while not stop.wait(0.5):
            pass
        log.info("Shutting down: deleting the Ray Serve deployment")
    finally:
        for sig, handler in handled.items():
            signal.signal(sig, handler)
        deleted = ray_backend.stop(started, settings.shutdown_grace_s + 30)
    if deleted:
        log.info("shutdown: the Ray Serve deployment is deleted%s", ", Ray stopped" if started else "")
    else:
        log.warning("shutdown: Ray's own processes stopped before the deployment could be deleted")


def run_server(state) -> None:
    """Serve until SIGINT/SIGTERM; running requests get serve.shutdown_grace_s (from the signal) to finish."""
    import uvicorn

    from ..server import create_app

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # the grace counts from the signal, for uvicorn and the workers alike
            state.stop_requested()
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self):
            """SIGINT and SIGTERM shut the server down gracefully, and then the command exits 0 (uvicorn would
            raise the signal again once done, ending the process by it)."""
            if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
                yield
                return
            handled = (signal.SIGINT, signal.SIGTERM)
            original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

    settings = state.settings
    log.info("serving %s on http://%s:%d", ", ".join(state.pool.names()),
                                               settings.host, settings.port)
    config = uvicorn.Config(create_app(state), host=settings.host, port=settings.port, log_config=None,
                            access_log=False, timeout_graceful_shutdown=settings.shutdown_grace_s)
    Server(config).run()
