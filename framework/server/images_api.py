"""POST /v1/images/generations and /v1/images/edits: OpenAI's Images API, with `stream=true` previews."""
from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from PIL import Image, UnidentifiedImageError

from ..errors import RequestError
from ..images import FORMATS
from .batcher import Job
from .media import IMAGE_FORMATS, encode_image
from .openai_api import ImageRequest, parse_image_request
from .pool import ServedModel
from .state import ServerState, error_body, error_status

GENERATION_FIELDS = {"model", "prompt", "n", "size", "response_format", "output_format", "output_compression",
                     "stream", "partial_images"}
EDIT_FIELDS = GENERATION_FIELDS | {"image", "image[]", "mask"}
MAX_UPLOAD_BYTES = 64 * 2 ** 20


def _size(images: list) -> str:
    return f"{images[0].width}x{images[0].height}" if images else "auto"


async def json_body(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body())
    except ValueError as e:
        raise RequestError(f"the request body is not JSON: {e}") from None
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    return body


async def form_body(request: Request) -> tuple[dict[str, Any], list[Image.Image]]:
    """A multipart form's fields (strings) and its uploaded images (`image`, or `image[]` for several)."""
    form = await request.form()
    fields, images = {}, []
    for key, value in form.multi_items():
        if key in ("image", "image[]") and hasattr(value, "read"):
            images.append(await _read_image(value, key))
        elif key == "mask":
            raise RequestError("mask is not supported: these models edit the whole image")
        elif hasattr(value, "read"):
            raise RequestError(f"{key} must be a form field, not a file")
        else:
            fields[key] = value
    return fields, images


async def _read_image(upload, key: str) -> Image.Image:
    data = await upload.read(MAX_UPLOAD_BYTES + 1)
    if len(data) > MAX_UPLOAD_BYTES:
        raise RequestError(f"{key}: the file is larger than {MAX_UPLOAD_BYTES // 2 ** 20} MiB")
    try:
        return await asyncio.to_thread(_decode, data)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as e:
        raise RequestError(f"{key}: {upload.filename or 'the upload'} is not an image in one of the formats diffstage "
                           f"reads ({', '.join(FORMATS.values())}): {e}") from None


def image_model(state: ServerState, request: Request, name) -> ServedModel:
    """The model a request to the Images API names, if it makes images (a video model's are jobs)."""
    model = state.pool.get(name)
    request.state.model = model.name
    if model.makes_videos:
        raise RequestError(f"model '{model.name}' makes videos: create a job with POST /v1/videos (the Images API "
                           f"serves: {', '.join(n for n, m in state.pool.models.items() if not m.makes_videos) or 'no model here'})")
    return model


def _decode(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data), formats=list(FORMATS)) as image:
        return image.convert("RGB")


def _job(state: ServerState, parsed: ImageRequest, batchable: bool = True, on_step=None) -> Job:
    return Job(parsed.model, parsed.prompt, parsed.seed, parsed.fields, parsed.cache, batchable=batchable,
               timeout_s=state.settings.request_timeout_s, on_step=on_step)


def _data(state: ServerState, parsed: ImageRequest, images: list, request: Request) -> list[dict]:
    out = []
    for image in images:
        data = encode_image(image, parsed.output_format, parsed.compression)
        if parsed.response_format == "url":
            file_id = state.files.put(data, IMAGE_FORMATS[parsed.output_format][1], f".{parsed.output_format}")
            out.append({"url": str(request.url_for("file", file_id=file_id)), "seed": parsed.seed})
        else:
            out.append({"b64_json": base64.b64encode(data).decode(), "seed": parsed.seed})
    return out


async def answer(state: ServerState, request: Request, parsed: ImageRequest, batchable: bool, event: str):
    """Submit the request and answer it: the images as JSON, or (stream) SSE events with previews."""
    request.state.model = parsed.model.name
    if parsed.stream:  # submitted before the stream starts: a full queue is still a 429
        queue = asyncio.Queue()
        job = state.submit(_job(state, parsed, batchable, _previews(parsed.partial_images, queue)))
        return StreamingResponse(_events(state, request, parsed, job, queue, event), media_type="text/event-stream")
    job = state.submit(_job(state, parsed, batchable))
    images = await state.wait(job, request)
    request.state.images = len(images)
    data = await asyncio.to_thread(_data, state, parsed, images, request)  # encoding: off the event loop
    return {"created": int(time.time()), "data": data, "size": _size(images), "output_format": parsed.output_format}


def _previews(wanted: int, queue: asyncio.Queue):
    """The job's step report: a decoded preview into `queue` at `wanted` evenly spaced steps (None: no previews)."""
    if not wanted:
        return None
    loop = asyncio.get_running_loop()

    def on_step(job, step, preview):
        marks = {round(step.total * (k + 1) / (wanted + 1)) for k in range(wanted)}
        if step.step in marks and step.step < step.total:
            images = preview()
            if images:
                loop.call_soon_threadsafe(queue.put_nowait, images[0])
    return on_step


async def _events(state: ServerState, request: Request, parsed: ImageRequest, job: Job, queue: asyncio.Queue,
                  event: str):
    waiter = asyncio.ensure_future(state.wait(job, request))
    sent = 0
    try:
        while not waiter.done() or not queue.empty():
            try:
                image = await asyncio.wait_for(queue.get(), timeout=0.05)
            except asyncio.TimeoutError:
                continue
            yield _sse(f"{event}.partial_image", {**_common(parsed, [image]), "partial_image_index": sent,
                                                  "b64_json": await asyncio.to_thread(_b64, image, parsed)})
            sent += 1
        images = waiter.result()
        request.state.images = len(images)
        for image in images:
            yield _sse(f"{event}.completed", {**_common(parsed, [image]), "usage": _usage(),
                                              "b64_json": await asyncio.to_thread(_b64, image, parsed)})
    except Exception as e:  # noqa: BLE001 - the stream has begun: the error is an event
        status, kind, outcome = error_status(e)
        request.state.outcome = outcome
        yield _sse("error", error_body(e, status, kind))
    finally:
        job.cancelled.set() if not job.future.done() else None  # the client left mid-stream
        waiter.cancel()


def _common(parsed: ImageRequest, images: list) -> dict:
    return {"created_at": int(time.time()), "size": _size(images), "quality": "auto", "background": "opaque",
            "output_format": parsed.output_format}


def _usage() -> dict:
    zero = {"image_tokens": 0, "text_tokens": 0}
    return {"input_tokens": 0, "input_tokens_details": zero, "output_tokens": 0, "total_tokens": 0}


def _b64(image, parsed: ImageRequest) -> str:
    return base64.b64encode(encode_image(image, parsed.output_format, parsed.compression)).decode()


def _sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps({'type': event, **data} if event != 'error' else data)}\n\n"


def images_router(state: ServerState) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/images/generations")
    async def generations(request: Request):
        body = await json_body(request)
        request.state.user = body.get("user")
        model = image_model(state, request, body.get("model"))
        parsed = parse_image_request(body, model, GENERATION_FIELDS)
        return await answer(state, request, parsed, True, "image_generation")

    @router.post("/v1/images/edits")
    async def edits(request: Request):
        body, images = await form_body(request)
        request.state.user = body.get("user")
        model = image_model(state, request, body.get("model"))
        if "image" not in model.checked.req_cls.request_fields():
            raise RequestError(f"model '{model.name}' takes no input image (its YAML declares no `image` request "
                               f"field); /v1/images/edits serves: "
                               + (", ".join(n for n, m in state.pool.models.items()
                                            if "image" in m.checked.req_cls.request_fields()) or "no model here"))
        if len(images) != 1:
            raise RequestError(f"send one image to edit (as `image`); got {len(images)}")
        parsed = parse_image_request(body, model, EDIT_FIELDS, form=True, inputs={"image": images[0]})
        return await answer(state, request, parsed, False, "image_edit")

    return router
