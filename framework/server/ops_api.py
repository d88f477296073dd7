"""The server's small endpoints: /health, /ready, /metrics, the model list and the files `url` answers link to."""
from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from .pool import NotFound
from .state import ServerState


def ops_router(state: ServerState) -> APIRouter:
    router = APIRouter()

    @router.get("/health")
    async def health():
        return {"status": "ok"}

    @router.get("/ready")
    async def ready():
        ok, why = state.ready()
        return JSONResponse({"status": why, "loaded": state.pool.loaded()}, status_code=200 if ok else 503)

    @router.get("/metrics")
    async def metrics():
        for name, worker in state.workers.items():
            state.metrics.queue_depth.labels(name).set(worker.depth())
            state.metrics.running.labels(name).set(worker.running_images())
        return Response(state.metrics.text(), media_type=CONTENT_TYPE_LATEST)

    @router.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(state, name) for name in state.pool.names()]}

    @router.get("/v1/models/{name:path}")
    async def model(name: str):
        return _model_card(state, state.pool.get(name).name)

    @router.get("/v1/files/{file_id}", name="file")
    async def file(file_id: str):
        found = await asyncio.to_thread(state.files.get, file_id)  # a Ray replica's store is another process
        if found is None:
            raise NotFound(f"no file {file_id} (files are kept for serve.url_ttl_s={state.settings.url_ttl_s:g} s)")
        return Response(found[0], media_type=found[1])

    return router


def _model_card(state: ServerState, name: str) -> dict:
    model = state.pool.models[name]
    return {"id": name, "object": "model", "created": int(state.started), "owned_by": "diffstage",
            "task": model.task, "loaded": bool(model.pipelines), "description": model.checked.spec.description}
