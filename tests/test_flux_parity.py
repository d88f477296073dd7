"""FLUX.1 dev and schnell: diffstage vs diffusers.FluxPipeline on tiny random checkpoints."""
import numpy as np
import pytest
import torch

from conftest import assert_matches_diffusers
from diffstage import build_pipeline

TOL = 1e-4
CASES = {
    "plain": dict(prompt="a red fox in the snow"),
    "true_cfg": dict(prompt="a red fox in the snow", negative_prompt="blurry", true_cfg_scale=2.5),
    "true_cfg_two_calls": dict(prompt="a red fox in the snow", negative_prompt="blurry", true_cfg_scale=2.5),
    "true_cfg_batch": dict(prompt=["a red fox", "a blue cat"], negative_prompt=["blurry", "dark"], true_cfg_scale=2.5,
                           num_images_per_prompt=2),
    "batch": dict(prompt=["a red fox", "a blue cat"], num_images_per_prompt=2),
}


@pytest.fixture(scope="module")
def reference_pipes(tiny_flux_dev, tiny_flux_schnell):
    from diffusers import FluxPipeline

    pipes = {}
    for name, path in (("flux", tiny_flux_dev), ("flux_schnell", tiny_flux_schnell)):
        pipe = FluxPipeline.from_pretrained(path, torch_dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        pipes[name] = (pipe, path)
    return pipes


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("model", ["flux", "flux_schnell"])
def test_parity_with_diffusers(reference_pipes, model, case):
    ref, path = reference_pipes[model]
    kw = dict(CASES[case])
    prompt = kw.pop("prompt")
    common = dict(height=48, width=32, num_inference_steps=3, max_sequence_length=16, guidance_scale=4.0,
                  output_type="np", **kw)
    expected = ref(prompt, generator=torch.Generator("cpu").manual_seed(7), **common).images
    pipe = build_pipeline(model, model_path=path)
    assert type(pipe.modules["transformer"]).__name__ == "FluxTransformer"  # the native transformer
    denoise = pipe.stages[4]
    denoise.cfg_batch = case != "true_cfg_two_calls"  # CFG branches as one batch (the default) or two calls
    calls = []
    hook = pipe.modules["transformer"].register_forward_pre_hook(lambda m, a, kw: calls.append(1), with_kwargs=True)
    try:
        ours = pipe(prompt, seed=7, **common).images
    finally:
        hook.remove()
        denoise.cfg_batch = True
    assert len(calls) == 3 * (2 if case == "true_cfg_two_calls" else 1)  # 3 steps
    assert_matches_diffusers(ours, expected, f"{model}/{case}", TOL)


def test_seed_changes_image_and_pil_output(tiny_flux_dev):
    pipe = build_pipeline("flux", model_path=tiny_flux_dev,
                          overrides=["sampling.height=32", "sampling.width=32", "sampling.num_inference_steps=2",
                                     "sampling.max_sequence_length=16"])
    a = pipe("a red fox", seed=0, output_type="np").images
    b = pipe("a red fox", seed=1, output_type="np").images
    c = pipe("a red fox", seed=0, output_type="np").images
    assert np.abs(a - b).max() > 1e-3 and np.array_equal(a, c)
    out = pipe("a red fox", seed=0)
    assert out.images[0].size == (32, 32) and out.images[0].mode == "RGB"
    assert list(out.timings) == ["0:InputValidationStage", "1:TextEncodingStage", "2:LatentPreparationStage",
                                 "3:TimestepPreparationStage", "4:DenoisingStage", "5:DecodingStage"]
