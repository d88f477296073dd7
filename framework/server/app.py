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
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..errors import DiffstageError, RequestError
from .images_api import MAX_UPLOAD_BYTES, images_router
from .ops_api import ops_router
from .state import ServerState, TooLarge, error_body, error_status, log
from .videos_api import videos_router

OPEN_PATHS = ("/health",)  # answered without the API key (a load balancer's probe has none)
MAX_REQUEST_BYTES = MAX_UPLOAD_BYTES + 2 ** 20  # an upload and its form fields


def _json(status: int, message: str, kind: str, code: str | None = None) -> tuple[dict, bytes]:
    return ({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]},
            json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode())


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
        refusal = self._refusal(scope)
        if refusal is not None:
            head, body = refusal
            await send(head)
            await send({"type": "http.response.body", "body": body})
            return self._log(scope, head["status"], start)
        received = [0]

        async def receiving():
            message = await receive()
            received[0] += len(message.get("body", b""))
            if received[0] > MAX_REQUEST_BYTES:
                raise TooLarge(f"the request is larger than {MAX_REQUEST_BYTES // 2 ** 20} MiB")
            return message

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receiving, sending)
        except Exception:  # answered 500 by Starlette's outermost handler: counted as the error it is
            status[0], scope.setdefault("state", {})["outcome"] = 500, "error"
            raise
        finally:
            self._log(scope, status[0], start)

    def _refusal(self, scope) -> tuple[dict, bytes] | None:
        """The answer to a request refused before it runs: no API key, or a declared size past the limit."""
        key = self.state.settings.api_key
        if key is not None and scope["path"] not in OPEN_PATHS and not _authorized(scope, key):
            head, body = _json(401, "missing or wrong API key: send `Authorization: Bearer KEY` (serve.api_key)",
                               "invalid_request_error", "invalid_api_key")
            head["headers"].append((b"www-authenticate", b"Bearer"))
            return head, body
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if length.isdigit() and int(length) > MAX_REQUEST_BYTES:
            return _json(413, f"the request is larger than {MAX_REQUEST_BYTES // 2 ** 20} MiB",
                         "invalid_request_error")
        return None

    def _log(self, scope, status: int, start: float) -> None:
        info = scope.get("state") or {}
        seconds = time.perf_counter() - start
        model = info.get("model")
        if scope["path"] in ("/v1/images/generations", "/v1/images/edits"):
            endpoint = scope["path"].rsplit("/", 1)[-1]
            outcome = info.get("outcome") or ("ok" if 0 < status < 400 else "error")
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
        if state.settings.preload and state.preloading is None:  # (a Ray replica loads before it serves)
            state.preload()
        yield
        state.shutdown()

    app = FastAPI(title="diffstage", version=__version__, lifespan=lifespan)
    app.add_middleware(AccessMiddleware, state=state)
    app.include_router(images_router(state))
    app.include_router(videos_router(state))
    app.include_router(ops_router(state))

    _error_handlers(app, state)
    return app


def _error_handlers(app: FastAPI, state: ServerState) -> None:
    """Every error answered in OpenAI's shape, with the status error_status gives it."""
    @app.exception_handler(DiffstageError)
    async def diffstage_error(request: Request, error: DiffstageError):
        return _error_response(error, state, request)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError):
        first = error.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ()) if part not in ("query", "path", "body"))
        return _error_response(RequestError(f"{where or 'the request'}: {first.get('msg')}"), state, request)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):  # unknown paths, wrong methods
        kind = "invalid_request_error" if error.status_code < 500 else "server_error"
        return JSONResponse({"error": {"message": f"{request.method} {request.url.path}: {error.detail}",
                                       "type": kind, "param": None, "code": None}},
                            status_code=error.status_code, headers=getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception):
        log.exception("internal error on %s", request.url.path)
        return _error_response(error, state, request)
