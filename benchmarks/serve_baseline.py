"""The baseline server of bench_serve.py, written the way most users would serve a Diffusers pipeline: one
FluxPipeline loaded at start, one lock around it (a pipeline is not safe to call from two threads at once),
and OpenAI's image endpoint in a small FastAPI app.

    python benchmarks/serve_baseline.py --port 8000 [--checkpoint models/digits/checkpoint]

Sampling is that of diffstage's digits YAML (pipelines_yaml/digits.yaml), so both servers draw the same images.
"""
from __future__ import annotations

import argparse
import base64
import io
import threading
import time
from pathlib import Path

import torch
import uvicorn
from diffusers import FluxPipeline
from fastapi import FastAPI
from pydantic import BaseModel

ROOT = Path(__file__).resolve().parents[1]
DIGITS_SAMPLING = dict(num_inference_steps=20, height=32, width=32, guidance_scale=0.0, true_cfg_scale=6.0,
                       negative_prompt="", max_sequence_length=16)


class GenerationRequest(BaseModel):
    prompt: str
    seed: int | None = None
    n: int = 1
    model: str | None = None  # accepted and ignored: this server has one model
    response_format: str = "b64_json"


def png_b64(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def make_app(checkpoint: Path) -> FastAPI:
    pipe = FluxPipeline.from_pretrained(checkpoint, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    lock = threading.Lock()
    app = FastAPI()

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.get("/ready")
    def ready():  # the pipeline loads before the server starts listening
        return {"status": "ready"}

    # A plain `def` endpoint: FastAPI runs it in its thread pool, so the event loop keeps answering while
    # the pipeline runs; the lock makes the requests take turns.
    @app.post("/v1/images/generations")
    def generate(request: GenerationRequest):
        seed = request.seed if request.seed is not None else int(torch.seed() % 2**31)
        with lock:
            images = pipe(request.prompt, num_images_per_prompt=request.n,
                          generator=torch.Generator("cpu").manual_seed(seed), **DIGITS_SAMPLING).images
        return {"created": int(time.time()), "data": [{"b64_json": png_b64(image)} for image in images]}

    return app


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "models" / "digits" / "checkpoint")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    uvicorn.run(make_app(args.checkpoint), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
