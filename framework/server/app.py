"""The FastAPI app of `diffstage serve`: the Images API and video jobs (images_api.py, videos_api.py), the model
list, /health, /ready, /metrics and the files `url` responses point to; an optional API key; one JSON log line
per request; and error answers in OpenAI's shape ({"error": {"message", "type", "param", "code"}})."""
from __future__ import annotations

import json
import math
import secrets
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from .. import __version__
from ..errors import DiffstageError
from .images_api import images_router
from .pool import NotFound
from .state import ServerState, error_body, error_status, log
from .videos_api import videos_router

OPEN_PATHS = ("/health",)  # answered without the API key (a load balancer's probe has none)


def _error_response(error: BaseException, state: ServerState, request: Request | None = None) -> JSONResponse:
    status, kind, outcome = error_status(error)
    if request is not None:
        request.state.outcome = outcome
    headers = {}
    if status == 429:  # about how long the queue takes to drain a batch
        headers["Retry-After"] = str(max(1, math.ceil(state.settings.max_wait_ms / 1000 + 1)))
    return JSONResponse(error_body(error, status, kind), status_code=status, headers=headers)


class AccessMiddleware:
    """The API key check, and one structured log line (with the request's metrics) per request."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [0]
        key = self.state.settings.api_key
        if key is not None and scope["path"] not in OPEN_PATHS and not _authorized(scope, key):
            body = json.dumps({"error": {"message": "missing or wrong API key: send `Authorization: Bearer KEY` "
                                                    "(serve.api_key)", "type": "invalid_request_error",
                                         "param": None, "code": "invalid_api_key"}}).encode()
            await send({"type": "http.response.start", "status": 401,
                        "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]})
            await send({"type": "http.response.body", "body": body})
            return self._log(scope, 401, start)

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            self._log(scope, status[0], start)

    def _log(self, scope, status: int, start: float) -> None:
        info = scope.get("state") or {}
        seconds = time.perf_counter() - start
        model = info.get("model")
        if scope["path"] in ("/v1/images/generations", "/v1/images/edits"):
            endpoint, outcome = scope["path"].rsplit("/", 1)[-1], info.get("outcome", "ok" if status < 400 else "error")
            self.state.metrics.requests.labels(model or "none", endpoint, outcome).inc()
            if model is not None:
                self.state.metrics.latency.labels(model, endpoint).observe(seconds)
        log.info(json.dumps({"method": scope["method"], "path": scope["path"], "status": status,
                             "seconds": round(seconds, 4), "model": model, "images": info.get("images"),
                             "outcome": info.get("outcome"), "user": info.get("user")}))


def _authorized(scope, key: str) -> bool:
    given = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
    return given.startswith("Bearer ") and secrets.compare_digest(given[7:].strip().encode(), key.encode())


def create_app(state: ServerState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app):
        if state.settings.preload:
            state.preload()
        yield
        state.shutdown()

    app = FastAPI(title="diffstage", version=__version__, lifespan=lifespan)
    app.add_middleware(AccessMiddleware, state=state)
    app.include_router(images_router(state))
    app.include_router(videos_router(state))

    @app.exception_handler(DiffstageError)
    async def diffstage_error(request: Request, error: DiffstageError):
        return _error_response(error, state, request)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError):
        return _error_response(DiffstageError(f"invalid request: {error.errors()[0].get('msg')}"), state, request)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception):
        log.exception("internal error on %s", request.url.path)
        return _error_response(error, state, request)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        ok, why = state.ready()
        return JSONResponse({"status": why, "loaded": state.pool.loaded()}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics():
        for name, worker in state.workers.items():
            state.metrics.queue_depth.labels(name).set(worker.depth())
        return Response(state.metrics.text(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(state, name) for name in state.pool.names()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        return _model_card(state, state.pool.get(name).name)

    @app.get("/v1/files/{file_id}", name="file")
    async def file(file_id: str):
        found = state.files.get(file_id)
        if found is None:
            raise NotFound(f"no file {file_id} (files are kept for serve.url_ttl_s={state.settings.url_ttl_s:g} s)")
        return Response(found[0], media_type=found[1])

    return app


def _model_card(state: ServerState, name: str) -> dict:
    model = state.pool.models[name]
    return {"id": name, "object": "model", "created": int(state.started), "owned_by": "diffstage",
            "task": model.task, "loaded": bool(model.pipelines), "description": model.checked.spec.description}
