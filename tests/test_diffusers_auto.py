"""The Diffusers fallback: a checkpoint whose pipeline class has no diffstage YAML runs through that
pipeline as one stage, with diffstage's loader (allowlist, safetensors, strict weights) and request checks."""
import json
import shutil

import numpy as np
import pytest
import torch

from diffstage import LoadError, RequestError, build_pipeline, loader


@pytest.fixture(scope="module")
def alpha_ckpt(tmp_path_factory):
    """A tiny PixArt checkpoint relabelled as PixArt-alpha, a pipeline class no shipped YAML serves."""
    from diffstage.models.pixart.tiny import build_tiny_pixart

    ckpt = tmp_path_factory.mktemp("ckpt") / "tiny-pixart-alpha"
    shutil.copytree(build_tiny_pixart(tmp_path_factory.mktemp("ckpt") / "tiny-pixart"), ckpt)
    index = json.loads((ckpt / "model_index.json").read_text())
    index["_class_name"] = "PixArtAlphaPipeline"
    (ckpt / "model_index.json").write_text(json.dumps(index))
    return ckpt


def test_a_checkpoint_without_a_yaml_matches_its_diffusers_pipeline(alpha_ckpt, tmp_path):
    from diffusers import PixArtAlphaPipeline

    ref = PixArtAlphaPipeline.from_pretrained(alpha_ckpt, torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    common = dict(height=32, width=32, num_inference_steps=3, max_sequence_length=16, guidance_scale=3.0,
                  negative_prompt="blurry", output_type="np")
    # the tiny transformer's size has no resolution bins: switch binning off in both
    expected = ref("a red fox", generator=torch.Generator("cpu").manual_seed(5), use_resolution_binning=False,
                   **common).images
    yaml = tmp_path / "auto.yaml"
    yaml.write_text("extends: diffusers_auto\nname: auto_no_binning\nstages:\n"
                    "  - {_target_: diffstage.stages.InputValidationStage, multiple_of: 8}\n"
                    "  - {_target_: diffstage.stages.DiffusersPipelineStage, call_kwargs: {use_resolution_binning: false}}\n")
    pipe = build_pipeline(str(yaml), model_path=alpha_ckpt)
    assert type(pipe.stages[1].pipe).__name__ == "PixArtAlphaPipeline"
    ours = pipe("a red fox", seed=5, **common).images
    diff = float(np.abs(ours - expected).max())
    print(f"diffusers_auto/PixArtAlphaPipeline: max|Δ| = {diff:.3g}")
    assert ours.shape == expected.shape and diff <= 1e-6
    with pytest.raises(RequestError, match="height must be a positive multiple of 8"):
        pipe("a red fox", seed=5, height=30)


def test_a_yaml_for_another_pipeline_points_at_the_fallback(alpha_ckpt):
    with pytest.raises(LoadError, match=r"is a 'PixArtAlphaPipeline', but model 'pixart_sigma' serves "
                                        r"PixArtSigmaPipeline; .*model=diffusers_auto"):
        build_pipeline("pixart_sigma", model_path=alpha_ckpt)


def test_the_fallback_keeps_the_loader_rules(alpha_ckpt, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(alpha_ckpt, ckpt)
    index = json.loads((ckpt / "model_index.json").read_text())
    (ckpt / "model_index.json").write_text(json.dumps({**index, "_class_name": "os"}))
    with pytest.raises(LoadError, match="pipeline class 'diffusers.os' cannot be loaded"):
        build_pipeline("diffusers_auto", model_path=ckpt)
    (ckpt / "model_index.json").write_text(json.dumps({**index, "_class_name": 5}))
    with pytest.raises(LoadError, match=r"model_index.json of '.*' names no pipeline class \(_class_name: 5\)"):
        build_pipeline("diffusers_auto", model_path=ckpt)
    (ckpt / "model_index.json").write_text(json.dumps(index))
    loader.clear_cache()
    (ckpt / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    (ckpt / "vae" / "diffusion_pytorch_model.bin").write_bytes(b"not really a pickle")
    from diffstage import UnsafeCheckpointError

    with pytest.raises(UnsafeCheckpointError):
        build_pipeline("diffusers_auto", model_path=ckpt)


def test_the_builder_sets_the_modules_of_the_fallback_stage(tmp_path):
    path = tmp_path / "auto.yaml"
    path.write_text("extends: diffusers_auto\nname: mine\nstages:\n  - _target_: diffstage.stages.InputValidationStage\n"
                    "  - _target_: diffstage.stages.DiffusersPipelineStage\n    modules: {vae: x}\n")
    from conftest import problems_of

    (problem,) = problems_of(path)
    assert problem.key == "stages[1].modules" and "is set by the builder" in problem.message
