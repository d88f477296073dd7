"""ImageEncodingStage: an input image from the request (PIL, tensor or path; `image=PATH` on the command line)
encoded by the VAE as Diffusers' editing pipelines do it."""
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from test_cli import run
from diffstage import Req, RequestError, build_pipeline
from diffstage.req import FieldSpec
from diffstage.stages import ImageEncodingStage

FAST = ["sampling.num_inference_steps=2"]


@pytest.fixture(scope="module")
def vae(tiny_flux_dev):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(tiny_flux_dev / "vae")


@pytest.fixture
def picture(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "input.png"
    Image.fromarray(rng.integers(0, 255, (40, 24, 3), dtype=np.uint8)).save(path)
    return path


def request(**kw):
    cls = Req.with_fields([FieldSpec("image", "request", type="image"), FieldSpec("image_latents", "state")])
    return cls(height=32, width=16, batch_size=2, **kw)


@torch.no_grad()
def test_encodes_like_diffusers(vae, picture):
    from diffusers.image_processor import VaeImageProcessor

    stage = ImageEncodingStage(vae)
    stage.bind({}, {})
    req = stage(request(image=str(picture)))
    processor = VaeImageProcessor(vae_scale_factor=2)
    pixels = processor.preprocess(processor.resize(Image.open(picture).convert("RGB"), 32, 16), 32, 16)
    expected = (vae.encode(pixels).latent_dist.mode() - vae.config.shift_factor) * vae.config.scaling_factor
    assert req.image_latents.shape == (2, 4, 16, 8)  # one copy per batch item
    assert torch.allclose(req.image_latents[1:], expected, atol=1e-6)
    same = stage(request(image=Image.open(picture))).image_latents  # a PIL image gives the same
    assert torch.equal(same, req.image_latents)


def test_bad_images_are_request_errors(vae, tmp_path):
    stage = ImageEncodingStage(vae)
    stage.bind({}, {})
    (tmp_path / "not.png").write_text("text")
    with pytest.raises(RequestError, match=r"image: cannot open '.*not.png' as an image"):
        stage(request(image=str(tmp_path / "not.png")))
    with pytest.raises(RequestError, match="image must be a PIL image, a \\[C, H, W\\] tensor in \\[0, 1\\] or a file"):
        stage(request(image=5))


YAML = '''
extends: digits
name: digits_with_image
request_fields:
  image: {type: image, doc: "an input image, encoded and kept (the digits model does not use it)"}
stages:
  - {_target_: diffstage.stages.InputValidationStage, multiple_of: 16, max_sequence_length_limit: 512,
     cfg_scale_field: true_cfg_scale}
  - _target_: diffstage.stages.TextEncodingStage
    encoders:
      - {text_encoder: text_encoder, tokenizer: tokenizer, output: pooler_output, field: pooled_prompt_embeds}
      - {text_encoder: text_encoder_2, tokenizer: tokenizer_2, max_length_field: max_sequence_length,
         prompt_field: prompt_2, field: prompt_embeds}
  - _target_: diffstage.stages.ImageEncodingStage
  - _target_: diffstage.stages.LatentPreparationStage
  - _target_: diffstage.stages.TimestepPreparationStage
  - {_target_: diffstage.stages.DenoisingStage, conditioning: [prompt_embeds, pooled_prompt_embeds]}
  - _target_: diffstage.stages.DecodingStage
'''


def test_image_from_the_command_line(tmp_path, picture):
    model = tmp_path / "with_image.yaml"
    model.write_text(textwrap.dedent(YAML))
    r = run("generate", f"model={model}", f"image={picture}", f"hydra.run.dir={tmp_path / 'run'}", *FAST)
    assert r.returncode == 0, r.stderr
    pipe = build_pipeline(str(model), overrides=FAST)
    out = pipe("a handwritten digit two", seed=0, image=str(picture))
    assert out.req.image_latents.shape[0] == 1
    with pytest.raises(RequestError, match="image: no image file at 'missing.png'"):
        pipe("a handwritten digit two", seed=0, image="missing.png")
    r = run("generate", f"image={picture}", f"hydra.run.dir={tmp_path / 'run2'}", *FAST)
    assert r.returncode == 2 and "model 'digits' takes no input image" in r.stderr


@torch.no_grad()
def test_keeps_the_resized_image_and_the_latent_shape(vae, picture):
    stage = ImageEncodingStage(vae, resized_field="condition_image", shape_field="image_latent_shape")
    flatten = lambda latents, req, settings: latents.flatten(2).transpose(1, 2)  # noqa: E731 (a packing step)
    stage.bind({"pack": flatten}, {})
    cls = Req.with_fields([FieldSpec("image", "request", type="image"), FieldSpec("image_latents", "state"),
                           FieldSpec("condition_image", "state"), FieldSpec("image_latent_shape", "state")])
    req = stage(cls(height=32, width=16, batch_size=1, image=str(picture)))
    assert req.image_latent_shape == (1, 4, 16, 8)  # before packing
    assert req.image_latents.shape == (1, 128, 4)
    assert req.condition_image.size == (16, 32)
    contract = ImageEncodingStage.contract({"resized_field": "condition_image", "shape_field": "image_latent_shape"})
    assert contract.writes == {"image_latents", "condition_image", "image_latent_shape"}
