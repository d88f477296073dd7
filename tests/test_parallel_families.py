"""Ulysses, Ring and CFG parallelism for the stock Diffusers transformers, through their model YAML's
acceleration declaration (or Diffusers' _cp_plan): 2 gloo processes give what one process gives, with odd
token counts (uneven splits) and padded text masks (Qwen-Image's joint attention)."""
import importlib
import json

import numpy as np
import pytest

from test_parallel import launch
from diffstage import build_pipeline

TOL = 1e-4
SEED = dict(seed=3, num_inference_steps=2)
PROMPTS = dict(prompt=["a red fox", "a blue cat in the big city at night"], negative_prompt=["blurry", "dark"])
FAMILIES = {  # model: (checkpoint builder, request, sizes: even and odd token counts)
    "sd3": ("sd3:build_tiny_sd3", dict(**PROMPTS, guidance_scale=4.0, max_sequence_length=15),
            {"even": dict(height=32, width=32), "odd": dict(height=48, width=48)}),  # 4 and 9 image tokens
    "pixart_sigma": ("pixart:build_tiny_pixart", dict(**PROMPTS, guidance_scale=4.0),
                     {"even": dict(height=32, width=32), "odd": dict(height=48, width=48)}),
    "qwen_image": ("qwen_image:build_tiny_qwen_image", dict(**PROMPTS, true_cfg_scale=4.0),
                   {"even": dict(height=32, width=32), "odd": dict(height=48, width=48)}),
    "qwen_image_edit": ("qwen_image:build_tiny_qwen_image_edit",
                        dict(prompt="make it red", negative_prompt="blurry", true_cfg_scale=4.0),
                        {"even": dict(height=32, width=32), "odd": dict(height=48, width=48)}),
    "wan_t2v": ("wan:build_tiny_wan", dict(**PROMPTS, guidance_scale=4.0, max_sequence_length=15),
                {"even": dict(height=32, width=48, num_frames=5),  # 2 x 2 x 3 = 12 video tokens
                 "odd": dict(height=48, width=48, num_frames=9)}),  # 3 x 3 x 3 = 27
}
CASES = [("ulysses", "even"), ("ulysses", "odd"), ("ring", "even"), ("ring", "odd"), ("cfg", "odd")]


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    from PIL import Image

    path = tmp_path_factory.mktemp("image") / "input.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(path)
    return str(path)


@pytest.mark.parametrize("model", sorted(FAMILIES))
def test_two_processes_match_one(model, picture, tmp_path):
    builder, request, sizes = FAMILIES[model]
    module, function = builder.split(":")
    checkpoint = getattr(importlib.import_module(f"diffstage.models.{module}.tiny"), function)(tmp_path / "ckpt")
    if model == "qwen_image_edit":
        request = dict(request, image=picture)
    requests = {size: {**request, **SEED, **sizes[size]} for size in sizes}
    launch(checkpoint, tmp_path, [{"name": f"{mode}-{size}", "model": model, "parallel": {mode: 2},
                                   "request": requests[size]} for mode, size in CASES])
    pipe = build_pipeline(model, model_path=checkpoint, overrides=["reuse.enabled=false"])
    expected = {size: pipe(**requests[size], output_type="np").images for size in sizes}
    for mode, size in CASES:
        ours = np.load(tmp_path / f"{mode}-{size}.npy")
        diff = float(np.abs(ours - expected[size]).max())
        print(f"{model} {mode}=2 {size}: max|Δ| = {diff:.3g}")
        assert ours.shape == expected[size].shape and diff <= TOL, (model, mode, size, diff)
        assert json.loads((tmp_path / f"{mode}-{size}.json").read_text())["bytes_sent"] > 0  # it communicated
