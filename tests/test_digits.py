"""The embedded `digits` model: its outputs show the prompted digit, and match Diffusers'."""
from pathlib import Path

import numpy as np
import pytest
import torch

from diffstage import build_pipeline, check_model
from diffstage.models.digits import data
from diffstage.models.digits.classifier import classify, generate_and_score


@pytest.fixture(scope="module")
def pipe():
    return build_pipeline("digits")


def test_default_model_and_checkpoint_are_shipped(pipe):
    from diffstage.builder import compose_config

    assert compose_config().model == "digits"
    assert pipe.spec.name == "digits" and pipe.defaults["height"] == 32
    assert type(pipe.modules["transformer"]).__name__ == "FluxTransformer"  # native, from the flux YAML
    assert len(check_model("digits").spec.examples) == 10


def test_checkpoint_stays_small(pipe):
    """The model card promises a checkpoint of at most 10 MiB (it ships inside the package)."""
    size = sum(f.stat().st_size for f in Path(pipe.checkpoint).rglob("*") if f.is_file())
    assert size <= 10 * 1024 * 1024, f"digits checkpoint is {size / 1024 ** 2:.1f} MiB"


def test_the_judge_recognises_real_digits_it_has_not_seen():
    from sklearn.svm import SVC

    images, labels = data.load()
    features, labels = data.images_to_features(images).numpy(), labels.numpy()
    held_out = SVC(gamma=0.001, C=10.0).fit(features[:1000], labels[:1000])  # the gate's recipe
    assert (held_out.predict(features[1000:]) == labels[1000:]).mean() > 0.95


def test_quality_gate(pipe):
    """200 generated digits (20 per digit, seeds 1000-1199, the YAML's default sampling): >= 97% recognised."""
    accuracy, confusion = generate_and_score(pipe, per_digit=20, seed_base=1000)
    print(f"digits quality gate: accuracy {accuracy:.2%}\n{confusion}")
    assert accuracy >= 0.97, f"accuracy {accuracy:.2%}\n{confusion}"


def test_the_drawings_are_new_digits_and_any_judge_reads_them(pipe):
    """The model card's checks on 50 images (seeds 40000-40049): not copies of training digits (a VAE copy of
    one sits about 0.5 from it in the judge's 8x8 space, real digits about 10.7 from their nearest other), and
    judges trained on either half of the real digits recognise them too."""
    from sklearn.svm import SVC

    images, labels = data.load()
    real, labels = data.images_to_features(images).numpy(), labels.numpy()
    drawn = np.concatenate([pipe(data.prompt(d), seed=40000 + 5 * d + k, output_type="np").images
                            for d in range(10) for k in range(5)])
    drawn = data.images_to_features(torch.from_numpy(drawn).permute(0, 3, 1, 2)).numpy()
    nearest = np.sqrt(((drawn[:, None] - real[None]) ** 2).sum(-1)).min(1)
    between = np.sqrt(((real[:, None] - real[None]) ** 2).sum(-1))
    np.fill_diagonal(between, np.inf)
    assert np.median(nearest) >= 0.5 * np.median(between.min(1))
    prompted = np.repeat(np.arange(10), 5)
    for half in (slice(0, 900), slice(900, None)):
        judge = SVC(gamma=0.001, C=10.0).fit(real[half], labels[half])
        assert (judge.predict(drawn) == prompted).mean() >= 0.96


def test_gate_fails_for_an_untrained_transformer(pipe, tmp_path):
    """The gate can fail: the same pipeline with a freshly initialised transformer draws no digits."""
    import shutil

    from diffusers import FluxTransformer2DModel

    ckpt = tmp_path / "untrained"
    shutil.copytree(pipe.checkpoint, ckpt)
    torch.manual_seed(0)
    untrained = FluxTransformer2DModel.from_config(FluxTransformer2DModel.load_config(ckpt / "transformer"))
    untrained.save_pretrained(ckpt / "transformer", safe_serialization=True)
    accuracy, _ = generate_and_score(build_pipeline("digits", model_path=ckpt), per_digit=3)
    assert accuracy < 0.5


def test_parity_with_diffusers(pipe):
    from diffusers import FluxPipeline

    ref = FluxPipeline.from_pretrained(pipe.checkpoint, torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    d = pipe.defaults
    worst = 0.0
    for digit, seed in ((7, 0), (3, 11)):
        prompt = data.prompt(digit)
        ours = pipe(prompt, seed=seed, output_type="np").images
        expected = ref(prompt, negative_prompt=d["negative_prompt"], true_cfg_scale=d["true_cfg_scale"],
                       guidance_scale=d["guidance_scale"], num_inference_steps=d["num_inference_steps"],
                       height=d["height"], width=d["width"], max_sequence_length=d["max_sequence_length"],
                       generator=torch.Generator("cpu").manual_seed(seed), output_type="np").images
        worst = max(worst, float(np.abs(ours - expected).max()))
    print(f"digits parity vs diffusers.FluxPipeline: max|Δ| = {worst:.3g}")
    assert worst <= 1e-4

