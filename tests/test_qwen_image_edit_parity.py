"""Qwen-Image-Edit: diffstage vs diffusers.QwenImageEditPipeline on a tiny random checkpoint, with an input image."""
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_matches_diffusers
from diffstage import RequestError, build_pipeline

TOL = 1e-4
LATENT_TOL = 1e-5
PROMPT = "make the fox red"
# Each case encodes a megapixel copy of the input image (as Diffusers does), so there are few of them.
CASES = {
    "true_cfg": dict(negative_prompt="blurry", true_cfg_scale=4.0),
    "no_negative": dict(true_cfg_scale=4.0),  # no negative prompt: no CFG
    "images_per_prompt": dict(negative_prompt="blurry", true_cfg_scale=4.0, num_images_per_prompt=2),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from diffstage.models.qwen_image.tiny import build_tiny_qwen_image_edit

    return build_tiny_qwen_image_edit(tmp_path_factory.mktemp("ckpt") / "tiny-qwen-image-edit")


@pytest.fixture(scope="module")
def pipes(checkpoint):
    from diffusers import QwenImageEditPipeline

    from diffstage.models.qwen_image.processor import Qwen2VLImageTextProcessor

    # Diffusers would load transformers.Qwen2VLProcessor, which needs torchvision for its video half: give it
    # the same processor without it (tokenization and image processing are Qwen2VLProcessor's own code)
    processor = Qwen2VLImageTextProcessor.from_pretrained(checkpoint / "processor")
    ref = QwenImageEditPipeline.from_pretrained(checkpoint, processor=processor, torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    return ref, build_pipeline("qwen_image_edit", model_path=checkpoint)


@pytest.fixture(scope="module")
def picture():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8))


def run_reference(ref, picture, prompt, **kw):
    """Diffusers' images and its final (packed) latents, caught by the step callback."""
    last = {}

    def keep_latents(pipe, i, t, tensors):
        last["latents"] = tensors["latents"]
        return tensors

    images = ref(picture, prompt, callback_on_step_end=keep_latents, **kw).images
    return images, last["latents"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_parity_with_diffusers(pipes, picture, case):
    ref, pipe = pipes
    common = dict(height=32, width=48, num_inference_steps=2, output_type="np", **CASES[case])
    expected, expected_latents = run_reference(ref, picture, PROMPT, generator=torch.Generator("cpu").manual_seed(3),
                                               **common)
    out = pipe(PROMPT, image=picture, seed=3, **common)
    assert_matches_diffusers(out.images, expected, f"qwen_image_edit/{case}", TOL)
    # The tiny model's outputs move little with the prompt and the image: the latents are compared closely too
    latent_diff = float((out.req.latents - expected_latents).abs().max())
    print(f"qwen_image_edit/{case}: latents max|Δ| = {latent_diff:.3g}")
    assert latent_diff <= LATENT_TOL


def test_parity_would_catch_a_lost_image_or_prompt(pipes, picture):
    """Flipping the input image or changing the prompt moves the latents far more than
    LATENT_TOL, so the parity cases would notice a pipeline that ignored either."""
    _, pipe = pipes
    kw = dict(height=32, width=48, num_inference_steps=2, output_type="latent", seed=3)
    base = pipe(PROMPT, image=picture, **kw).images
    flipped = pipe(PROMPT, image=picture.transpose(Image.FLIP_LEFT_RIGHT), **kw).images
    reworded = pipe("a blue cat in the city", image=picture, **kw).images
    assert float((base - flipped).abs().max()) > 10 * LATENT_TOL
    assert float((base - reworded).abs().max()) > 10 * LATENT_TOL


def test_output_size_follows_the_image(pipes, tmp_path):
    """Without height/width the output is about a megapixel in the image's aspect ratio, as in Diffusers;
    the image comes from a file path as well as a PIL image."""
    _, pipe = pipes
    path = tmp_path / "tall.png"
    Image.new("RGB", (20, 40), (200, 30, 30)).save(path)
    out = pipe(PROMPT, image=str(path), num_inference_steps=1, output_type="latent", seed=0)
    assert (out.req.height, out.req.width) == (1440, 736)  # sqrt(2**20 / 2) * (2, 1), in multiples of 32
    assert out.req.raw_latent_shape[-2:] == (180, 92)


def test_missing_image_is_a_request_error(pipes):
    _, pipe = pipes
    with pytest.raises(RequestError, match="image must be a PIL image, a \\[C, H, W\\] tensor in \\[0, 1\\] or a file"):
        pipe(PROMPT, num_inference_steps=1)


def test_cli_edits_an_image_file(checkpoint, tmp_path):
    """`image=PATH` on the command line; the output size follows the image when sampling leaves it unset."""
    from test_cli import run

    Image.new("RGB", (64, 48), (10, 200, 30)).save(tmp_path / "in.png")
    r = run("generate", "model=qwen_image_edit", f"model_path={checkpoint}", f"image={tmp_path / 'in.png'}",
            "prompt=make it red", "sampling.num_inference_steps=1", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    path = tmp_path / "run" / "image.png"
    assert r.stdout.strip().splitlines()[-1] == str(path)
    image = Image.open(path)
    assert image.size == (1184, 896)  # 4:3 at about a megapixel, in multiples of 32
    assert image.text["prompt"] == "make it red" and "in.png" in image.text["config"]
