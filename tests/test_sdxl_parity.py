"""Stable Diffusion XL: diffstage vs diffusers.StableDiffusionXLPipeline on tiny random checkpoints, one whose
model_index.json says force_zeros_for_empty_prompt: true (as SDXL base) and one that says false."""
import json
import shutil

import numpy as np
import pytest
import torch

from conftest import assert_matches_diffusers
from diffstage import RequestError, build_pipeline

TOL = 1e-4
STEPS = 3
CASES = {
    "no_cfg": dict(prompt="a red fox in the snow", guidance_scale=1.0),
    "cfg": dict(prompt="a red fox in the snow", guidance_scale=5.0),
    "cfg_negative": dict(prompt="a red fox in the snow", negative_prompt="blurry", negative_prompt_2="dark",
                         guidance_scale=5.0),
    # Diffusers guides against zeros (force_zeros_for_empty_prompt) when negative_prompt is unset, even with this
    "cfg_negative_2_only": dict(prompt="a red fox in the snow", negative_prompt_2="dark", guidance_scale=5.0),
    "batch": dict(prompt=["a red fox", "a blue cat"], negative_prompt=["blurry", "dark"], guidance_scale=5.0,
                  num_images_per_prompt=2),
    "prompt_2_micro": dict(prompt="a red fox", prompt_2="a blue cat in the city", guidance_scale=5.0,
                           original_size=(96, 64), crops_coords_top_left=(8, 4), target_size=(48, 32),
                           negative_original_size=(24, 40), negative_crops_coords_top_left=(2, 6),
                           negative_target_size=(64, 64)),
}
COMMON = dict(height=32, width=48, num_inference_steps=STEPS, output_type="np")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{force_zeros_for_empty_prompt: checkpoint}: the same weights, the flag differs."""
    from diffstage.models.sdxl.tiny import build_tiny_sdxl

    root = tmp_path_factory.mktemp("ckpt")
    return {zeros: build_tiny_sdxl(root / f"tiny-sdxl-{zeros}", force_zeros_for_empty_prompt=zeros)
            for zeros in (True, False)}


@pytest.fixture(scope="module")
def pipes(checkpoints):
    """{force_zeros_for_empty_prompt: (Diffusers pipeline, ours)}."""
    from diffusers import StableDiffusionXLPipeline

    made = {}
    for zeros, path in checkpoints.items():
        ref = StableDiffusionXLPipeline.from_pretrained(path, torch_dtype=torch.float32)
        ref.set_progress_bar_config(disable=True)
        made[zeros] = ref, build_pipeline("sdxl", model_path=path)
    return made


def run_both(ref, pipe, case: str, cfg_batch: bool = True):
    """(ours, Diffusers') images for `case`, and how many UNet calls ours made."""
    kw = {**COMMON, **CASES[case]}
    prompt = kw.pop("prompt")
    expected = ref(prompt, generator=torch.Generator("cpu").manual_seed(3), **kw).images
    denoise = pipe.stages[4]
    denoise.cfg_batch = cfg_batch
    calls = []
    hook = pipe.modules["unet"].register_forward_pre_hook(lambda m, a, k: calls.append(1), with_kwargs=True)
    try:
        ours = pipe(prompt, seed=3, **kw).images
    finally:
        hook.remove()
        denoise.cfg_batch = True
    return ours, expected, len(calls)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("zeros", [True, False], ids=["force_zeros", "empty_prompt"])
def test_parity_with_diffusers(pipes, zeros, case):
    ref, pipe = pipes[zeros]
    ours, expected, calls = run_both(ref, pipe, case)
    assert calls == STEPS  # with CFG, both branches in one UNet call (added_cond_kwargs joined)
    assert_matches_diffusers(ours, expected, f"sdxl/{case}/force_zeros={zeros}", TOL)


@pytest.mark.parametrize("case", ["cfg", "prompt_2_micro"])
def test_two_cfg_calls_match_one_batched_call(pipes, case):
    ref, pipe = pipes[True]
    separate, expected, calls = run_both(ref, pipe, case, cfg_batch=False)
    assert calls == 2 * STEPS
    assert_matches_diffusers(separate, expected, f"sdxl/{case}/two calls", TOL)
    batched, _, _ = run_both(ref, pipe, case)
    assert np.abs(batched - separate).max() <= TOL


def test_force_zeros_comes_from_the_checkpoint(pipes):
    """The same weights guide against zeros or against the empty prompt, as each model_index.json says."""
    kw = {**COMMON, **CASES["cfg"]}
    zeros, empty = (pipes[z][1](seed=3, **kw).images for z in (True, False))
    assert np.abs(zeros - empty).max() > 1e-3
    kw["negative_prompt"] = "blurry"  # a negative prompt is encoded either way
    assert np.abs(pipes[True][1](seed=3, **kw).images - pipes[False][1](seed=3, **kw).images).max() == 0


def test_a_checkpoint_without_the_key_guides_against_zeros_as_diffusers(checkpoints, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    path = shutil.copytree(checkpoints[False], tmp_path / "no-key")
    index = json.loads((path / "model_index.json").read_text())
    del index["force_zeros_for_empty_prompt"]
    (path / "model_index.json").write_text(json.dumps(index))
    ref = StableDiffusionXLPipeline.from_pretrained(path, torch_dtype=torch.float32)  # its default: True
    ref.set_progress_bar_config(disable=True)
    ours, expected, _ = run_both(ref, build_pipeline("sdxl", model_path=path), "cfg")
    assert_matches_diffusers(ours, expected, "sdxl/cfg/no force_zeros_for_empty_prompt key", TOL)


def test_prompt_2_and_micro_conditioning_reach_the_unet(pipes):
    pipe = pipes[True][1]
    kw = {**COMMON, "prompt": "a red fox", "guidance_scale": 1.0}
    base = pipe(seed=0, **kw).images
    for extra in (dict(prompt_2="a blue cat"), dict(original_size=(64, 64)), dict(crops_coords_top_left=(4, 0)),
                  dict(target_size=(16, 16))):
        assert np.abs(pipe(seed=0, **kw, **extra).images - base).max() > 1e-4, extra


@pytest.mark.parametrize("value", [(32,), "32x48", (32, -1), (32.0, 48), [True, 1]])
def test_a_malformed_size_is_refused(pipes, value):
    pipe = pipes[True][1]
    with pytest.raises(RequestError, match=r"^original_size must be two non-negative integers \(height, width\), "
                                           r"got "):
        pipe("a red fox", seed=0, original_size=value, **COMMON)


def test_a_unet_that_does_not_fit_the_text_encoder_is_refused():
    from types import SimpleNamespace

    from diffstage import DiffstageError
    from diffstage.models.sdxl.callbacks import MICRO, model_inputs

    unet = SimpleNamespace(add_embedding=SimpleNamespace(linear_1=SimpleNamespace(in_features=96)),
                           config=SimpleNamespace(addition_time_embed_dim=8))
    req = SimpleNamespace(height=32, width=48, prompt_embeds=torch.zeros(1, 77, 80),
                          pooled_prompt_embeds=torch.zeros(1, 32), **dict.fromkeys(MICRO))
    with pytest.raises(DiffstageError, match=r"^the UNet's added embedding takes 96 numbers, but 6 micro-conditioning "
                                             r"ids x addition_time_embed_dim 8 \+ the pooled text projection's 32 make "
                                             r"80: check the unet's and text_encoder_2's config.json$"):
        model_inputs(req, {}, unet, False)
