"""Video jobs, as OpenAI's videos API: POST /v1/videos queues a job and returns it; GET /v1/videos/{id} shows
its status and progress; GET /v1/videos/{id}/content is the MP4; GET /v1/videos lists them; DELETE cancels a
job (between denoising steps) and forgets it.

A job belongs to the server, not to the connection that made it: it runs to the end whether or not anyone
waits, and no fixed timeout marks it failed while it runs. Finished jobs are kept for serve.url_ttl_s."""
from __future__ import annotations

import asyncio
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request, Response

from ..errors import RequestError, shown
from .batcher import Job
from .images_api import form_body, json_body
from .media import encode_video
from .openai_api import frames_for, parse_image_request
from .pool import NotFound
from .state import ServerState, error_body, error_status, log

VIDEO_FIELDS = {"model", "prompt", "seconds", "size", "input_reference"}


@dataclass(eq=False)
class VideoJob:
    id: str
    job: Job
    model: str
    prompt: str
    seconds: str
    size: str
    created_at: int = field(default_factory=lambda: int(time.time()))
    status: str = "queued"
    progress: int = 0
    completed_at: int | None = None
    expires_at: int | None = None
    error: dict | None = None
    content: bytes | None = None

    def record(self) -> dict[str, Any]:
        return {"id": self.id, "object": "video", "model": self.model, "status": self.status,
                "progress": self.progress, "created_at": self.created_at, "completed_at": self.completed_at,
                "expires_at": self.expires_at, "error": self.error, "prompt": self.prompt, "seconds": self.seconds,
                "size": self.size}


class VideoJobs:
    def __init__(self, state: ServerState):
        self.state = state
        self.jobs: dict[str, VideoJob] = {}
        self.finishing: set[asyncio.Task] = set()
        self._lock = threading.Lock()

    def get(self, video_id: str) -> VideoJob:
        self._expire()
        with self._lock:
            if video_id not in self.jobs:
                raise NotFound(f"no video job {shown(video_id)} (finished jobs are kept for serve.url_ttl_s)")
            return self.jobs[video_id]

    async def create(self, body: dict[str, Any]) -> VideoJob:
        model = self.state.pool.get(body.get("model"))
        if not model.makes_videos:
            served = [n for n, m in self.state.pool.models.items() if m.makes_videos]
            raise RequestError(f"model '{model.name}' makes images, not videos; /v1/videos serves: "
                               f"{', '.join(served) or 'no model here'}")
        if body.get("input_reference") is not None:
            raise RequestError("input_reference is not supported by the video models served here")
        fields = {k: v for k, v in body.items() if k not in ("seconds", "input_reference")}
        declared = {s.name for s in model.checked.req_cls.extra_fields()}
        if body.get("seconds") is not None and "num_frames" in declared and "num_frames" not in body:
            fields["num_frames"] = str(frames_for(body["seconds"], self.state.settings.video_fps))
        parsed = parse_image_request(fields, model, VIDEO_FIELDS, form=True)
        video = VideoJob(f"video_{secrets.token_hex(12)}", None, model.name, parsed.prompt,
                         str(body.get("seconds") or 0), str(body.get("size") or "auto"))

        def on_step(job, event, preview):
            video.status, video.progress = "in_progress", min(99, int(100 * event.step / event.total))

        video.job = Job(model, parsed.prompt, parsed.seed, parsed.fields, parsed.cache, batchable=False,
                        on_step=on_step)
        self.state.submit(video.job)
        with self._lock:
            self.jobs[video.id] = video
        task = asyncio.get_running_loop().create_task(self._finish(video))
        self.finishing.add(task)  # the loop keeps only a weak reference to a task
        task.add_done_callback(self.finishing.discard)
        return video

    async def _finish(self, video: VideoJob) -> None:
        try:
            frames = (await asyncio.wrap_future(video.job.future))[0]
            video.content = await asyncio.to_thread(encode_video, frames, self.state.settings.video_fps,
                                                    {"prompt": video.prompt, "seed": str(video.job.seed),
                                                     "model": video.model})
            video.status, video.progress, outcome = "completed", 100, "ok"
        except Exception as e:  # noqa: BLE001 - the job's record says why it failed
            status, kind, outcome = error_status(e)
            video.status, video.error = "failed", {"code": outcome, "message": error_body(e, status, kind)["error"]["message"]}
        video.completed_at = int(time.time())
        video.expires_at = video.completed_at + int(self.state.settings.url_ttl_s)
        self.state.metrics.requests.labels(video.model, "videos", outcome).inc()
        log.info("video %s %s in %ds", video.id, video.status, video.completed_at - video.created_at)

    def delete(self, video_id: str) -> dict[str, Any]:
        video = self.get(video_id)
        video.job.cancelled.set()  # a running job stops at its next denoising step
        with self._lock:
            self.jobs.pop(video_id, None)
        return {"id": video_id, "object": "video.deleted", "deleted": True}

    def _expire(self) -> None:
        now = time.time()
        with self._lock:
            for video_id in [k for k, v in self.jobs.items() if v.expires_at is not None and v.expires_at < now]:
                del self.jobs[video_id]


def videos_router(state: ServerState) -> APIRouter:
    router, jobs = APIRouter(), VideoJobs(state)

    @router.post("/v1/videos")
    async def create(request: Request):
        if request.headers.get("content-type", "").startswith("application/json"):
            body = await json_body(request)
        else:
            body, images = await form_body(request)
            if images:
                raise RequestError("input_reference is not supported by the video models served here")
        return (await jobs.create(body)).record()

    @router.get("/v1/videos")
    async def listing(limit: int = 20, after: str | None = None):
        jobs._expire()
        records = sorted(jobs.jobs.values(), key=lambda v: v.created_at, reverse=True)
        if after is not None:
            ids = [v.id for v in records]
            records = records[ids.index(after) + 1:] if after in ids else []
        page = records[:max(1, min(limit, 100))]
        return {"object": "list", "data": [v.record() for v in page], "has_more": len(records) > len(page),
                "first_id": page[0].id if page else None, "last_id": page[-1].id if page else None}

    @router.get("/v1/videos/{video_id}")
    async def retrieve(video_id: str):
        return jobs.get(video_id).record()

    @router.get("/v1/videos/{video_id}/content")
    async def content(video_id: str, variant: str = "video"):
        video = jobs.get(video_id)
        if variant != "video":
            raise RequestError(f"variant must be video (thumbnails and spritesheets are not made), got {shown(variant)}")
        if video.content is None:
            raise RequestError(f"video {video_id} is {video.status}; its content is ready when it is completed")
        return Response(video.content, media_type="video/mp4")

    @router.delete("/v1/videos/{video_id}")
    async def delete(video_id: str):
        return jobs.delete(video_id)

    return router
