"""Qwen-Image: diffstage vs diffusers.QwenImagePipeline on a tiny random checkpoint."""
import pytest
import torch

from conftest import assert_matches_diffusers
from diffstage import build_pipeline

TOL = 1e-4
CASES = {
    "true_cfg": dict(prompt="a red fox in the snow", negative_prompt="blurry", true_cfg_scale=4.0),
    "no_negative": dict(prompt="a red fox in the snow", true_cfg_scale=4.0),  # no negative prompt: no CFG
    "batch": dict(prompt=["a red fox", "a blue cat in the city"], negative_prompt=["blurry", "bad"],
                  true_cfg_scale=4.0),
    # num_images_per_prompt > 1 with prompts of different lengths is left out: Diffusers repeats the text mask
    # tiled (p0 p1 p0 p1) but the embeddings interleaved (p0 p0 p1 p1); diffstage keeps both interleaved
    "images_per_prompt": dict(prompt="a red fox", negative_prompt="blurry", true_cfg_scale=4.0,
                              num_images_per_prompt=2),
}


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    from diffusers import QwenImagePipeline

    from diffstage.models.qwen_image.tiny import build_tiny_qwen_image

    ckpt = build_tiny_qwen_image(tmp_path_factory.mktemp("ckpt") / "tiny-qwen-image")
    ref = QwenImagePipeline.from_pretrained(ckpt, torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    return ref, build_pipeline("qwen_image", model_path=ckpt)


@pytest.mark.parametrize("case", sorted(CASES))
def test_parity_with_diffusers(pipes, case):
    ref, pipe = pipes
    kw = dict(CASES[case])
    prompt = kw.pop("prompt")
    common = dict(height=32, width=48, num_inference_steps=3, output_type="np", **kw)
    expected = ref(prompt, generator=torch.Generator("cpu").manual_seed(3), **common).images
    ours = pipe(prompt, seed=3, **common).images
    assert_matches_diffusers(ours, expected, f"qwen_image/{case}", TOL)
