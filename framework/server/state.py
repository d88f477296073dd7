"""What one server holds: its settings, models, a worker per model, the files it serves, its metrics; and how
its requests wait (for their images, their client, their deadline) and end (an HTTP status per error)."""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

from ..errors import DiffstageError, RequestError, StageError
from ..run_config import RunConfig
from ..run_events import RunCancelled
from .batcher import DeadlineExceeded, Job, ModelWorker, QueueFull, ShuttingDown, timed_out
from .media import FileStore
from .metrics import Metrics
from .pool import ModelPool, NotFound
from .settings import ServeSettings

log = logging.getLogger("diffstage.server")


class TooLarge(RequestError):
    """The request body passes the server's limit (HTTP 413)."""


class ClientGone(DiffstageError):
    """The client closed the connection before its answer was ready."""


def _out_of_memory(error: BaseException) -> bool:
    """MemoryError or torch's OutOfMemoryError, also behind the StageError that names the stage it hit."""
    for _ in range(5):  # the error, and the few it was raised from
        if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
            return True
        if error.__cause__ is None:
            return False
        error = error.__cause__
    return False


def error_status(error: BaseException) -> tuple[int, str, str]:
    """HTTP status, OpenAI error type and our outcome label for an error that ended a request."""
    if _out_of_memory(error):
        return 503, "server_error", "out_of_memory"
    for cls, status, kind, outcome in (
            (NotFound, 404, "invalid_request_error", "not_found"),
            (TooLarge, 413, "invalid_request_error", "bad_request"),
            (QueueFull, 429, "rate_limit_error", "rejected"),
            (DeadlineExceeded, 504, "timeout_error", "timeout"),
            (ShuttingDown, 503, "server_error", "rejected"),
            (ClientGone, 499, "invalid_request_error", "cancelled"),
            (RunCancelled, 499, "invalid_request_error", "cancelled"),
            (StageError, 500, "server_error", "error"),
            (RequestError, 400, "invalid_request_error", "bad_request")):
        if isinstance(error, cls):
            return status, kind, outcome
    if isinstance(error, DiffstageError):  # what the CLI reports with exit status 2
        return 400, "invalid_request_error", "bad_request"
    return 500, "server_error", "error"


def error_body(error: BaseException, status: int, kind: str, param: str | None = None) -> dict:
    message = str(error) if isinstance(error, DiffstageError) else f"internal error: {type(error).__name__}: {error}"
    if _out_of_memory(error):
        message = f"out of memory: {message}"
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


class ServerState:
    def __init__(self, run: RunConfig, settings: ServeSettings):
        self.run, self.settings = run, settings
        self.pool = ModelPool(run, settings.models, settings.memory_budget_gb)
        self.metrics = Metrics()
        self.files = FileStore(settings.url_ttl_s)
        self.workers = {name: ModelWorker(self.pool, model, settings.max_batch, settings.max_wait_ms,
                                          settings.queue_size, self._observe_call)
                        for name, model in self.pool.models.items()}
        self.started = time.time()
        self.preloading: threading.Thread | None = None
        self.preload_error: BaseException | None = None
        self.stopping_since: float | None = None

    def preload(self) -> None:
        """Load every model in the background (/ready says when they are)."""
        def load():
            try:
                for model in self.pool.models.values():
                    self.pool.acquire(model, model.cache_kind(None))
                    self.pool.release(model)
                    self.metrics.loaded.set(len(self.pool.loaded()))
            except Exception as e:  # noqa: BLE001 - reported by /ready and the log; requests say it again
                self.preload_error = e
                log.error("cannot load the models: %s", e)

        self.preloading = threading.Thread(target=load, name="diffstage-preload", daemon=True)
        self.preloading.start()

    def ready(self) -> tuple[bool, str]:
        if self.preload_error is not None:
            return False, f"loading failed: {self.preload_error}"
        if self.settings.preload and (self.preloading is None or self.preloading.is_alive()):
            return False, "loading models"
        return True, "ready"

    def submit(self, job: Job) -> Job:
        self.workers[job.model.name].submit(job)
        return job

    async def wait(self, job: Job, request: Any) -> list:
        """The job's images; ClientGone when the client leaves first, DeadlineExceeded past its deadline (both
        cancel the job between denoising steps)."""
        future = asyncio.wrap_future(job.future)
        try:
            return await self._wait(job, future, request)
        except asyncio.CancelledError:  # the server stopped waiting (shutdown past its grace): so does the job
            job.cancelled.set()
            raise

    async def _wait(self, job: Job, future, request: Any) -> list:
        while True:
            done, _ = await asyncio.wait({future}, timeout=0.05)
            if done:
                return future.result()
            if request is not None and await request.is_disconnected():
                job.cancelled.set()
                future.cancel()  # nobody will read its result
                raise ClientGone("the client closed the connection")
            if job.deadline is not None and time.monotonic() > job.deadline:
                job.cancelled.set()
                future.cancel()
                raise timed_out(job.timeout_s)

    def _observe_call(self, outcome: str, batch: list[Job], result: Any, seconds: float) -> None:
        model = batch[0].model.name
        self.metrics.observe_call(model, outcome, sum(j.images for j in batch), result)
        self.metrics.loaded.set(len(self.pool.loaded()))

    def stop_requested(self) -> None:
        """The signal to stop came (SIGTERM, Ctrl-C): serve.shutdown_grace_s counts from now."""
        if self.stopping_since is None:
            self.stopping_since = time.monotonic()

    def shutdown(self) -> dict[str, int]:
        """Stop every worker: waiting jobs fail (503), running ones get what is left of serve.shutdown_grace_s
        (counted from the signal) to finish, then are cancelled."""
        report = {"cancelled_waiting": 0, "running": 0}
        grace = self.settings.shutdown_grace_s
        if self.stopping_since is not None:
            grace = max(0.0, grace - (time.monotonic() - self.stopping_since))
        for worker in self.workers.values():
            for key, n in worker.stop(grace).items():
                report[key] += n
        log.info("shutdown: %d running requests finished or cancelled, %d waiting requests cancelled",
                 report["running"], report["cancelled_waiting"])
        return report
