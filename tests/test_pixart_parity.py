"""PixArt-Sigma: diffstage vs diffusers.PixArtSigmaPipeline on a tiny random checkpoint, with its DPM-Solver and
with Euler schedulers (init_noise_sigma, scale_model_input, a stochastic step drawing from the request's generator)."""
import numpy as np
import pytest
import torch

from conftest import REPO, assert_matches_diffusers
from diffstage import build_pipeline

TOL = 1e-4
CASES = {
    "cfg": dict(prompt="a red fox in the snow", negative_prompt="blurry", guidance_scale=4.0),
    "cfg_empty_negative": dict(prompt="a red fox in the snow", guidance_scale=4.0),
    "no_cfg": dict(prompt="a red fox", guidance_scale=1.0),
    "batch": dict(prompt=["a red fox", "a blue cat"], negative_prompt="blurry", guidance_scale=4.0,
                  num_images_per_prompt=2),
}
SCHEDULERS = ["DPMSolverMultistepScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler"]


@pytest.fixture(scope="module")
def tiny_pixart(tmp_path_factory):
    from diffstage.models.pixart.tiny import build_tiny_pixart

    return build_tiny_pixart(tmp_path_factory.mktemp("ckpt") / "tiny-pixart")


@pytest.fixture(scope="module")
def pipes(tiny_pixart, tmp_path_factory):
    """Per scheduler class: (Diffusers' pipeline with it, ours through a YAML whose modules.scheduler names it)."""
    import diffusers

    out = {}
    folder = tmp_path_factory.mktemp("yamls")
    for name in SCHEDULERS:
        ref = diffusers.PixArtSigmaPipeline.from_pretrained(tiny_pixart, torch_dtype=torch.float32)
        ref.scheduler = getattr(diffusers, name).from_config(ref.scheduler.config)
        ref.set_progress_bar_config(disable=True)
        yaml = folder / f"{name}.yaml"
        yaml.write_text(f"extends: {REPO / 'pipelines_yaml' / 'pixart_sigma.yaml'}\nname: pixart_{name}\n"
                        f"modules:\n  scheduler: {{_target_: diffusers.{name}}}\n  vae:\n  text_encoder:\n"
                        "  tokenizer:\n  transformer:\n")
        out[name] = (ref, build_pipeline(str(yaml), model_path=tiny_pixart))
    return out


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_parity_with_diffusers(pipes, scheduler, case):
    ref, pipe = pipes[scheduler]
    kw = dict(CASES[case])
    prompt = kw.pop("prompt")
    common = dict(height=32, width=48, num_inference_steps=4, max_sequence_length=16, output_type="np", **kw)
    expected = ref(prompt, generator=torch.Generator("cpu").manual_seed(3), use_resolution_binning=False,
                   clean_caption=False, **common).images
    ours = pipe(prompt, seed=3, **common).images
    assert_matches_diffusers(ours, expected, f"pixart_sigma/{scheduler}/{case}", TOL)


def test_the_stochastic_step_draws_from_the_request_seed(pipes):
    _, pipe = pipes["EulerAncestralDiscreteScheduler"]
    common = dict(height=32, width=32, num_inference_steps=3, max_sequence_length=16, output_type="np")
    a, b = pipe("a red fox", seed=0, **common).images, pipe("a red fox", seed=0, **common).images
    assert np.array_equal(a, b)  # the ancestral noise comes from the request's generator
    assert not np.array_equal(a, pipe("a red fox", seed=1, **common).images)


def test_euler_needs_scale_model_input(pipes):
    """The Euler parity above rests on scale_model_input: without it the image is far off."""
    ref, pipe = pipes["EulerDiscreteScheduler"]
    common = dict(height=32, width=32, num_inference_steps=3, max_sequence_length=16, output_type="np",
                  guidance_scale=1.0)
    expected = ref("a red fox", generator=torch.Generator("cpu").manual_seed(0), use_resolution_binning=False,
                   clean_caption=False, **common).images
    denoise = pipe.stages[4]
    denoise.scale_model_input = False
    try:
        off = pipe("a red fox", seed=0, **common).images
    finally:
        denoise.scale_model_input = True
    assert np.abs(off - expected).max() > 1e-2
    assert np.abs(pipe("a red fox", seed=0, **common).images - expected).max() <= TOL
