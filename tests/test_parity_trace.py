"""diffstage.parity: trace a pipeline stage by stage and step by step, and line it up with the Diffusers
pipeline's step latents to find where a gap opens (README: debugging a parity gap)."""
import pytest
import torch

from diffstage import build_pipeline
from diffstage.parity import compare, reference_steps, trace


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from diffusers import StableDiffusionPipeline

    from diffstage.models.sd15.tiny import build_tiny_sd15

    path = build_tiny_sd15(tmp_path_factory.mktemp("ckpt") / "tiny-sd15", scheduler="ddim")
    ref = StableDiffusionPipeline.from_pretrained(path, torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    return ref, build_pipeline("sd15", model_path=path)


KW = dict(height=32, width=32, num_inference_steps=3, guidance_scale=7.5)


def test_trace_lines_up_with_the_reference_step_by_step(pair, capsys):
    ref, pipe = pair
    ours = trace(pipe, "a red fox", seed=1, **KW)
    assert {"1:TextEncodingStage.prompt_embeds", "1:TextEncodingStage.negative_prompt_embeds",
            "2:LatentPreparationStage.latents", "step 1.latents", "step 3.latents", "5:DecodingStage.output"} <= set(ours)
    image, theirs = reference_steps(ref, "a red fox", generator=torch.Generator("cpu").manual_seed(1),
                                    output_type="np", **KW)
    theirs["1:TextEncodingStage.prompt_embeds"] = ref.encode_prompt("a red fox", "cpu", 1, True)[0]
    rows = compare(ours, theirs, show=True)
    assert [key for key, _ in rows] == ["1:TextEncodingStage.prompt_embeds", "step 1.latents", "step 2.latents",
                                        "step 3.latents"]
    assert all(diff <= 1e-5 for _, diff in rows)
    assert "first gap" not in capsys.readouterr().out


def test_compare_marks_where_the_gap_opens(pair, capsys):
    ref, pipe = pair
    ours = trace(pipe, "a red fox", seed=1, **KW)
    _, theirs = reference_steps(ref, "a red fox", generator=torch.Generator("cpu").manual_seed(1),
                                **{**KW, "guidance_scale": 3.0})  # another guidance: the first step departs
    theirs["1:TextEncodingStage.prompt_embeds"] = ref.encode_prompt("a red fox", "cpu", 1, True)[0]
    theirs["2:LatentPreparationStage.latents"] = torch.zeros(1, 2, 2)
    rows = dict(compare(ours, theirs))
    lines = capsys.readouterr().out.splitlines()
    assert rows["1:TextEncodingStage.prompt_embeds"] <= 1e-6 and rows["step 1.latents"] > 1e-3
    assert rows["2:LatentPreparationStage.latents"] == "shape [1, 4, 16, 16] vs [1, 2, 2]"
    assert [line.split()[0] for line in lines if line.endswith("<- first gap")] == ["2:LatentPreparationStage.latents"]
