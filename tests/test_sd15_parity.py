"""Stable Diffusion 1.5: diffstage vs diffusers.StableDiffusionPipeline on tiny random checkpoints,
with SD 1.5's own scheduler (PNDM) and with DDIM and Euler."""
import pytest
import torch

from conftest import REPO, assert_matches_diffusers
from diffstage import build_pipeline

REPO_YAML = REPO / "pipelines_yaml" / "sd15.yaml"

TOL = 1e-4
CASES = {
    "cfg": dict(prompt="a red fox in the snow", guidance_scale=7.5),
    "cfg_negative": dict(prompt="a red fox in the snow", negative_prompt="blurry", guidance_scale=7.5),
    "no_cfg": dict(prompt="a red fox in the snow", guidance_scale=1.0),
    "batch": dict(prompt=["a red fox", "a blue cat"], negative_prompt=["blurry", "dark"], guidance_scale=7.5),
}
# Every case with SD 1.5's own scheduler; CFG with and without a negative prompt with the others.
RUNS = [("pndm", case) for case in sorted(CASES)] + \
       [(s, case) for s in ("ddim", "euler") for case in ("cfg", "cfg_negative")]


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    """scheduler -> (the Diffusers pipeline, ours), each on its own tiny checkpoint (same weights)."""
    from diffusers import StableDiffusionPipeline

    from diffstage.models.sd15.tiny import build_tiny_sd15

    made = {}

    def get(scheduler):
        if scheduler not in made:
            path = build_tiny_sd15(tmp_path_factory.mktemp("ckpt") / f"tiny-sd15-{scheduler}", scheduler=scheduler)
            ref = StableDiffusionPipeline.from_pretrained(path, torch_dtype=torch.float32)
            ref.set_progress_bar_config(disable=True)
            made[scheduler] = ref, build_pipeline("sd15", model_path=path)
        return made[scheduler]

    return get


@pytest.mark.parametrize("scheduler,case", RUNS)
def test_parity_with_diffusers(pipes, scheduler, case):
    ref, pipe = pipes(scheduler)
    assert type(ref.scheduler).__name__.lower().startswith(scheduler)
    kw = dict(CASES[case])
    prompt = kw.pop("prompt")
    common = dict(height=32, width=32, num_inference_steps=3, output_type="np", **kw)
    expected = ref(prompt, generator=torch.Generator("cpu").manual_seed(3), **common).images
    ours = pipe(prompt, seed=3, **common).images
    assert_matches_diffusers(ours, expected, f"sd15/{scheduler}/{case}", TOL)


def test_validate_says_ok(capsys):
    from diffstage.cli import main

    try:
        main(["validate", "sd15"])
    except SystemExit as e:  # a failed check exits 2
        assert e.code in (None, 0), capsys.readouterr().err
    out = capsys.readouterr().out
    assert out.startswith(f"OK {REPO_YAML}: model 'sd15' (StableDiffusionPipeline, t2i), 6 stages, 5 modules")
    assert "stages[4] DenoisingStage: reads ['cfg_scale', 'do_cfg', 'latents', 'prompt_embeds', 'timesteps']" in out


def test_a_unet_needs_latents_arg(pipes, tmp_path):
    """Without `latents_arg: sample` the UNet would get the stage's default keyword: the build refuses it, saying
    which argument the forward lacks and which setting names it (the README says so)."""
    from diffstage import DiffstageError

    text = REPO_YAML.read_text()
    assert "    latents_arg: sample" in text
    path = tmp_path / "sd15.yaml"
    path.write_text(text.replace("    latents_arg: sample", "    # latents_arg: sample"))
    ref, _ = pipes("pndm")
    with pytest.raises(DiffstageError, match=r"sd15.yaml:\d+: stages\[4\]: DenoisingStage could not be created: "
                                             r"ValueError: UNet2DConditionModel.forward takes no argument "
                                             r"'hidden_states' \(it takes sample, timestep, encoder_hidden_states, "
                                             r".*\): set latents_arg to the name it gives that input"):
        build_pipeline(str(path), model_path=ref.name_or_path)


def test_the_readme_shows_the_whole_yaml_and_callbacks():
    """README's "A UNet model: SD 1.5" shows sd15.yaml whole and the callbacks as they are."""
    import re

    text = (REPO / "README.md").read_text()
    start = text.index("### A UNet model: SD 1.5")
    section = text[start:text.index("\n## ", start)]
    (yaml_block,) = re.findall(r"```yaml\n(.*?)```", section, re.S)
    assert yaml_block == REPO_YAML.read_text()
    (python_block,) = re.findall(r"```python\n(.*?)```", section, re.S)
    source = (REPO / "models" / "sd15" / "callbacks.py").read_text()
    assert source.endswith(python_block.split("\n\n\n", 1)[1])  # every function, after the import
    assert python_block.startswith("from diffstage.callbacks import reads\n") and "import reads" in source


def test_a_unet_takes_no_step_cache(pipes):
    from diffstage import DiffstageError

    ref, _ = pipes("pndm")
    with pytest.raises(DiffstageError, match=r"stages\[4\] DenoisingStage: cache=first_block: UNet2DConditionModel does "
                                             r"not support step caches .*a model without one chain of repeated blocks, "
                                             r"such as a UNet, cannot take them\); use cache=none"):
        build_pipeline("sd15", model_path=ref.name_or_path, overrides=["cache=first_block"])
