"""One worker thread per served model: a bounded queue of jobs, compatible jobs that arrive within
serve.max_wait_ms run as one pipeline call (each prompt with its own seed: the image it would get alone), and
cancellation between denoising steps.

A job's future gets its images, or the error that ended it. A batch that fails is rerun job by job, so a request
that breaks a stage fails alone; a batch stops early only when every job in it is cancelled or past its deadline
(the others' images are still wanted)."""
from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any

from ..errors import DiffstageError
from ..run_events import RunCancelled, StepEvent, observing
from .pool import ModelPool, ServedModel


class QueueFull(DiffstageError):
    """The model's queue holds serve.queue_size jobs already (HTTP 429)."""


class DeadlineExceeded(DiffstageError):
    """The job did not finish within serve.request_timeout_s (HTTP 504)."""


class ShuttingDown(DiffstageError):
    """The server is stopping and takes no new work (HTTP 503)."""


_ids = itertools.count()
log = logging.getLogger("diffstage.server")


def timed_out(seconds: float) -> DeadlineExceeded:
    return DeadlineExceeded(f"the request did not finish within serve.request_timeout_s={seconds:g} seconds")


@dataclass(eq=False)
class Job:
    """One request: its prompt and seed, the request fields it shares with its batch, and how it ends."""
    model: ServedModel
    prompt: str
    seed: int
    fields: dict[str, Any]  # other request fields (num_images_per_prompt, sizes, steps, ...)
    cache: str  # step cache kind
    batchable: bool = True  # False: runs alone (an input image, a video job)
    timeout_s: float | None = None  # how long it may take from its arrival (serve.request_timeout_s)
    on_step: Callable[[Job, StepEvent, Callable[[], list]], None] | None = None  # progress, previews
    future: Future = field(default_factory=Future)
    cancelled: threading.Event = field(default_factory=threading.Event)
    created: float = field(default_factory=time.monotonic)
    id: int = field(default_factory=lambda: next(_ids))

    @property
    def deadline(self) -> float | None:
        return None if self.timeout_s is None else self.created + self.timeout_s

    @property
    def images(self) -> int:
        return int(self.fields.get("num_images_per_prompt") or 1)

    def key(self) -> Any:
        """Jobs with equal keys can share a pipeline call."""
        if not self.batchable:
            return ("alone", self.id)
        return (self.cache, repr(sorted(self.fields.items())))

    def dead(self) -> bool:
        return self.cancelled.is_set() or (self.deadline is not None and time.monotonic() > self.deadline)

    def why_dead(self) -> DiffstageError:
        if self.cancelled.is_set():
            return RunCancelled("the request was cancelled")
        return timed_out(self.timeout_s)

    def settle(self, result: Any = None, error: BaseException | None = None) -> None:
        try:
            self.future.set_exception(error) if error is not None else self.future.set_result(result)
        except InvalidStateError:  # settled already (cancelled by its waiter)
            pass


class ModelWorker:
    """The queue and the thread that runs one model's jobs."""

    def __init__(self, pool: ModelPool, model: ServedModel, max_batch: int, max_wait_ms: float, queue_size: int,
                 observe: Callable[[str, list[Job], Any, float], None] | None = None):
        self.pool, self.model = pool, model
        self.max_batch, self.max_wait, self.queue_size = max_batch, max_wait_ms / 1000, queue_size
        self.observe = observe  # called after each pipeline call: (outcome, batch, output or error, seconds)
        self.queue: deque[Job] = deque()
        self.running: list[Job] = []
        self.stopping = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name=f"diffstage-{model.name}", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> Future:
        with self._cond:
            if self.stopping:
                raise ShuttingDown("the server is shutting down")
            self._drop_dead()  # jobs whose clients left hold no place in the queue
            if len(self.queue) >= self.queue_size:
                raise QueueFull(f"model '{self.model.name}' has {len(self.queue)} requests waiting "
                                f"(serve.queue_size); retry later")
            self.queue.append(job)
            self._cond.notify()
        return job.future

    def depth(self) -> int:
        """Jobs waiting (those whose clients left are not counted: they go at the next look)."""
        return sum(1 for job in list(self.queue) if not job.dead())

    def running_images(self) -> int:
        return sum(job.images for job in self.running)

    def _drop_dead(self) -> None:
        """Settle and remove the queued jobs that were cancelled or passed their deadline (holding _cond)."""
        for job in [j for j in self.queue if j.dead()]:
            self.queue.remove(job)
            job.settle(error=job.why_dead())

    def stop(self, grace_s: float) -> dict[str, int]:
        """Take no more jobs, fail the waiting ones, give the running batch `grace_s` to finish, then cancel it."""
        with self._cond:
            self.stopping = True
            waiting, running = list(self.queue), list(self.running)
            self.queue.clear()
            self._cond.notify_all()
        for job in waiting:
            job.settle(error=ShuttingDown("the server shut down before this request ran"))
        self._thread.join(grace_s)
        if self._thread.is_alive():
            for job in running:
                job.cancelled.set()
            self._thread.join(5)
        return {"cancelled_waiting": len(waiting), "running": len(running)}

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            with self._cond:
                self.running = batch
            try:
                self._run(batch)
            except Exception as e:  # noqa: BLE001 - a bug here must not stop the model: its jobs hear of it
                log.exception("the worker of model '%s' failed", self.model.name)
                for job in batch:
                    job.settle(error=e)
            finally:
                with self._cond:
                    self.running = []

    def _next_batch(self) -> list[Job] | None:
        with self._cond:
            while True:
                self._drop_dead()
                if not self.queue:
                    if self.stopping:
                        return None
                    self._cond.wait(0.5)  # wakes for deadlines of nothing: cheap
                    continue
                batch = self._compatible(self.queue[0])
                wait = self.queue[0].created + self.max_wait - time.monotonic()
                if sum(j.images for j in batch) >= self.max_batch or not batch[0].batchable or wait <= 0:
                    for job in batch:
                        self.queue.remove(job)
                    return batch
                self._cond.wait(wait)

    def _compatible(self, first: Job) -> list[Job]:
        """`first` and the queued jobs that can join it, oldest first, up to max_batch images."""
        batch, images, key = [first], first.images, first.key()
        if first.batchable:
            for job in itertools.islice(self.queue, 1, None):
                if job.key() == key and images + job.images <= self.max_batch:
                    batch.append(job)
                    images += job.images
        return batch

    def _run(self, batch: list[Job]) -> None:
        for job in [j for j in batch if j.dead()]:  # cancelled while it waited for the window
            job.settle(error=job.why_dead())
        batch = [j for j in batch if not j.future.done()]
        if not batch:
            return
        model = self.model
        start = time.perf_counter()
        try:
            pipe = self.pool.acquire(model, batch[0].cache)
        except Exception as e:  # noqa: BLE001 - the model cannot load: every job of the batch hears why
            self._observed("error", batch, e, start)
            for job in batch:
                job.settle(error=e)
            return
        try:
            if len(batch) > 1 and not pipe.takes_seed_lists():  # its stages cannot give each prompt its seed
                for job in batch:
                    self._run([job])
                return
            out = self._call(pipe, batch)
        except RunCancelled:
            self._observed("cancelled", batch, None, start)
            for job in batch:
                job.settle(error=job.why_dead())
            return
        except Exception as e:  # noqa: BLE001 - a batch that fails is retried job by job; a job alone fails alone
            if len(batch) > 1:
                for job in batch:
                    self._run([job])
                return
            self._observed("error", batch, e, start)
            batch[0].settle(error=e)
            return
        finally:
            self.pool.release(model)
        self._observed("ok", batch, out, start)  # counted before anyone hears of it
        offset = 0
        for job in batch:
            job.settle(result=out.images[offset:offset + job.images])
            offset += job.images

    def _observed(self, outcome: str, batch: list[Job], result: Any, start: float) -> None:
        if self.observe is not None:
            self.observe(outcome, batch, result, time.perf_counter() - start)

    def _call(self, pipe, batch: list[Job]):
        """One pipeline call for the batch: a job alone as it is; several as one prompt (and seed) each."""
        fields = dict(batch[0].fields)
        if len(batch) == 1:
            fields.update(prompt=batch[0].prompt, seed=batch[0].seed)
        else:
            fields.update(prompt=[j.prompt for j in batch], seed=[j.seed for j in batch])
        def observer(event: StepEvent) -> None:
            if all(job.dead() for job in batch):
                raise RunCancelled("every request of this batch was cancelled or passed its deadline")
            preview = _preview(pipe, event)
            offset = 0
            for job in batch:
                if job.on_step is not None and not job.dead():
                    try:
                        job.on_step(job, event, lambda o=offset, n=job.images: preview()[o:o + n])
                    except Exception:  # noqa: BLE001 - a preview that fails costs the previews, not the images
                        log.warning("step report of request %d failed; it gets no more", job.id, exc_info=True)
                        job.on_step = None
                offset += job.images

        with observing(observer):
            return pipe(**fields)


def _preview(pipe, event: StepEvent) -> Callable[[], list]:
    """Decodes the step's latents once, when a job first asks for a preview at this step."""
    memo: list = []

    def get() -> list:
        if not memo:
            memo.extend(pipe.preview(event.req, event.latents) if event.latents is not None else [])
        return memo
    return get
