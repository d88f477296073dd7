"""Stable Diffusion 3: diffstage vs diffusers.StableDiffusion3Pipeline on a tiny random checkpoint."""
import numpy as np
import pytest
import torch

from conftest import REPO, assert_matches_diffusers
from diffstage import Req, build_pipeline

REPO_YAML = REPO / "pipelines_yaml" / "sd3.yaml"

TOL = 1e-4
CASES = {
    "no_cfg": dict(prompt="a red fox in the snow", guidance_scale=1.0),
    "cfg": dict(prompt="a red fox in the snow", negative_prompt="blurry", guidance_scale=4.0),
    "cfg_empty_negative": dict(prompt="a red fox in the snow", guidance_scale=4.0),
    "three_prompts": dict(prompt="a red fox", prompt_2="a blue cat", prompt_3="a green tree", guidance_scale=4.0,
                          negative_prompt="blurry", negative_prompt_2="dark", negative_prompt_3="bad"),
    "batch": dict(prompt=["a red fox", "a blue cat"], negative_prompt=["blurry", "dark"], guidance_scale=4.0,
                  num_images_per_prompt=2),
}


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory):
    from diffstage.models.sd3.tiny import build_tiny_sd3

    return build_tiny_sd3(tmp_path_factory.mktemp("ckpt") / "tiny-sd3")


@pytest.fixture(scope="module")
def pipes(tiny_sd3):
    from diffusers import StableDiffusion3Pipeline

    ref = StableDiffusion3Pipeline.from_pretrained(tiny_sd3, torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    return ref, build_pipeline("sd3", model_path=tiny_sd3)


@pytest.mark.parametrize("case", sorted(CASES))
def test_parity_with_diffusers(pipes, case):
    ref, pipe = pipes
    kw = dict(CASES[case])
    prompt = kw.pop("prompt")
    common = dict(height=32, width=48, num_inference_steps=3, max_sequence_length=16, output_type="np", **kw)
    expected = ref(prompt, generator=torch.Generator("cpu").manual_seed(3), **common).images
    ours = pipe(prompt, seed=3, **common).images
    assert_matches_diffusers(ours, expected, f"sd3/{case}", TOL)


def test_the_third_prompt_reaches_t5(pipes):
    _, pipe = pipes
    common = dict(height=32, width=32, num_inference_steps=2, max_sequence_length=16, output_type="np")
    a = pipe("a red fox", seed=0, **common).images
    b = pipe("a red fox", seed=0, prompt_3="a green tree", **common).images
    assert np.abs(a - b).max() > 1e-4


def test_combined_fields_need_the_combine_callback(tmp_path):
    from conftest import problems_of
    from diffstage import DiffstageError
    from diffstage.stages import TextEncodingStage

    text = (REPO_YAML.read_text().replace("    text_encoding:\n      combine: diffstage.models.sd3.callbacks.combine\n", ""))
    path = tmp_path / "sd3.yaml"
    path.write_text(text)
    (problem,) = problems_of(path)
    assert problem.key == "pipeline_config.callbacks.text_encoding" and problem.stage == "TextEncodingStage"
    assert problem.message == "missing required callback 'text_encoding.combine'"
    stage = TextEncodingStage([], combined_fields=["prompt_embeds"])
    stage.bind({"combine": lambda outputs, req, settings, negative: {"wrong": 1}}, {})
    with pytest.raises(DiffstageError, match=r"the combine callback must return a dict with the keys \['prompt_embeds'\]"
                                             r" \(combined_fields\), got \['wrong'\]"):
        stage.combine(Req(), "")
