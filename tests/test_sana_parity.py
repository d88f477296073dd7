"""Sana: diffstage (pipelines_yaml/sana.yaml, standard stages only) vs diffusers.SanaPipeline on a tiny random
checkpoint: Gemma-2 with its complex human instruction (the YAML's settings) before the positive prompt only, lower-cased and stripped
prompts, right padding, the attention masks, <bos> + the last max_sequence_length - 1 tokens, DPM-Solver on flow
sigmas."""
import numpy as np
import pytest
import torch

from conftest import REPO, assert_matches_diffusers
from diffstage import build_pipeline

TOL = 1e-4
# "cfg" has capitals and outer spaces (lower-cased and stripped, as Diffusers does); "long_prompt" is cut to
# max_sequence_length - 2 tokens after the instruction.
CASES = {
    "cfg": dict(prompt="  A Red FOX in the snow ", negative_prompt="Blurry", guidance_scale=4.5),
    "cfg_empty_negative": dict(prompt="a red fox in the snow", guidance_scale=4.5),
    "no_cfg": dict(prompt="a red fox", guidance_scale=1.0),
    "batch": dict(prompt=["a red fox", "a blue cat sitting on a big tree at night"], negative_prompt="blurry",
                  guidance_scale=4.5),
    "long_prompt": dict(prompt="a photo of a big red fox and a small blue cat with a yellow bird in the green forest "
                               "at night under the moon", guidance_scale=4.5),
}
SIZE = dict(height=32, width=64, num_inference_steps=3, max_sequence_length=12, output_type="np")


@pytest.fixture(scope="module")
def tiny_sana(tmp_path_factory):
    from diffstage.models.sana.tiny import build_tiny_sana

    return build_tiny_sana(tmp_path_factory.mktemp("ckpt") / "tiny-sana")


@pytest.fixture(scope="module")
def ref(tiny_sana):
    import diffusers

    pipe = diffusers.SanaPipeline.from_pretrained(tiny_sana, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe(tiny_sana):
    return build_pipeline(str(REPO / "pipelines_yaml" / "sana.yaml"), model_path=tiny_sana)


def run_both(ref, pipe, prompt, **kw):
    common = {**SIZE, **kw}
    expected = ref(prompt, generator=torch.Generator("cpu").manual_seed(3), use_resolution_binning=False,
                   clean_caption=False, **common).images
    return pipe(prompt, seed=3, **common).images, expected


@pytest.mark.parametrize("case", sorted(CASES))
def test_parity_with_diffusers(ref, pipe, case):
    kw = dict(CASES[case])
    ours, expected = run_both(ref, pipe, kw.pop("prompt"), **kw)
    assert_matches_diffusers(ours, expected, f"sana/{case}", TOL)


def interleaved_masks(encode_prompt):
    """SanaPipeline.encode_prompt with every output's copies per prompt kept together: Diffusers repeats the
    embeddings that way but tiles the attention masks (prompt 1, prompt 2, prompt 1, ...)."""
    def encode(self, *args, num_images_per_prompt=1, **kwargs):
        outs = encode_prompt(self, *args, num_images_per_prompt=1, **kwargs)
        return tuple(None if o is None else o.repeat_interleave(num_images_per_prompt, dim=0) for o in outs)
    return encode


def test_two_images_per_prompt_match_diffusers_with_its_mask_order_fixed(ref, pipe, monkeypatch):
    prompts, kw = ["a red fox", "a blue cat sitting on a big tree at night"], dict(
        negative_prompt="blurry", guidance_scale=4.5, num_images_per_prompt=2)
    ours, as_shipped = run_both(ref, pipe, prompts, **kw)
    off = float(np.abs(ours - as_shipped).max())
    print(f"sana/two_images_per_prompt, Diffusers as shipped: max|Δ| = {off:.3g}")
    # If this fails, Diffusers has started repeating the masks as it repeats the embeddings: update the README.
    assert off > 1e-2, "SanaPipeline's masks now follow its embeddings' order"
    monkeypatch.setattr(type(ref), "encode_prompt", interleaved_masks(type(ref).encode_prompt))
    ours, expected = run_both(ref, pipe, prompts, **kw)
    assert_matches_diffusers(ours, expected, "sana/two_images_per_prompt (Diffusers' mask order patched)", TOL)


def test_right_padding_matters(ref, pipe):
    """The parity above rests on right padding: with Gemma's own (left) the image is far off."""
    encoder, reuse = pipe.stages[1].encoders[0], pipe.reuse
    encoder["padding_side"], pipe.reuse = None, None  # changed in place: the stored encoding must not come back
    try:
        ours, expected = run_both(ref, pipe, "a red fox", negative_prompt="blurry", guidance_scale=4.5)
    finally:
        encoder["padding_side"], pipe.reuse = "right", reuse
    assert np.abs(ours - expected).max() > 1e-2


def test_without_the_instruction(ref, pipe):
    """An empty complex_human_instruction setting is Diffusers' complex_human_instruction=[] (no instruction, the
    prompt padded to max_sequence_length), and far from the image with it."""
    settings = pipe.stages[1].settings
    kept = settings["complex_human_instruction"]
    settings["complex_human_instruction"] = []
    try:
        ours, with_instruction = run_both(ref, pipe, "a red fox", guidance_scale=4.5)
    finally:
        settings["complex_human_instruction"] = kept
    expected = ref("a red fox", generator=torch.Generator("cpu").manual_seed(3), use_resolution_binning=False,
                   guidance_scale=4.5, complex_human_instruction=[], **SIZE).images
    assert_matches_diffusers(ours, expected, "sana/no_instruction", TOL)
    assert np.abs(ours - with_instruction).max() > 1e-2


def test_a_transformer_with_another_timestep_scale_is_refused(pipe):
    """SanaPipeline multiplies the timestep by the transformer's timestep_scale, which no denoising callback sees
    (all SanaPipeline checkpoints have 1.0): another value is refused, not run wrongly."""
    from diffstage import DiffstageError

    config = pipe.modules["transformer"].config
    pipe.modules["transformer"].register_to_config(timestep_scale=2.0)
    try:
        with pytest.raises(DiffstageError, match="the transformer's config has timestep_scale 2.0; this YAML serves "
                                                 "SanaPipeline checkpoints, whose timestep_scale is 1.0"):
            pipe("a red fox", seed=0, **SIZE)
    finally:
        pipe.modules["transformer"].register_to_config(timestep_scale=config.get("timestep_scale", 1.0))
    assert pipe.modules["transformer"].config.timestep_scale == 1.0


# --- step caches, from sana.yaml's acceleration declaration ----------------------------------------------------
def cached_run(tiny_sana, *overrides):
    pipe = build_pipeline(str(REPO / "pipelines_yaml" / "sana.yaml"), model_path=tiny_sana,
                          overrides=["reuse.enabled=false", *overrides])
    out = pipe("a red fox in the snow", seed=3, negative_prompt="blurry", guidance_scale=4.5,
               **{**SIZE, "num_inference_steps": 5})
    stats = next(r["step_cache"] for r in out.reports.values() if r and "step_cache" in r)
    return out.images, stats


@pytest.mark.parametrize("kind", ["first_block", "teacache"])
def test_step_caches_at_threshold_0_give_the_uncached_image(tiny_sana, pipe, kind):
    plain = pipe("a red fox in the snow", seed=3, negative_prompt="blurry", guidance_scale=4.5,
                 **{**SIZE, "num_inference_steps": 5}).images
    images, stats = cached_run(tiny_sana, f"cache={kind}", "cache.threshold=0")
    assert np.array_equal(images, plain)
    assert stats == {"kind": kind, "threshold": 0, "computed": 5, "cached": 0}  # CFG batched: one call a step


def test_teacache_with_a_large_threshold_skips_the_middle_steps(tiny_sana, pipe):
    """threshold 100 with no rescaling, warmup 1, final 1: the middle steps take the cache; the image stays close."""
    plain = pipe("a red fox in the snow", seed=3, negative_prompt="blurry", guidance_scale=4.5,
                 **{**SIZE, "num_inference_steps": 5}).images
    images, stats = cached_run(tiny_sana, "cache=teacache", "cache.threshold=100", "cache.warmup=1", "cache.final=1")
    diff = float(np.abs(images - plain).max())
    print(f"sana: teacache threshold 100, {stats}, max|Δ| vs uncached = {diff:.3g}")
    assert stats == {"kind": "teacache", "threshold": 100, "computed": 2, "cached": 3}
    assert np.isfinite(images).all() and 0 < diff <= 0.1  # measured 0.056 (3 of 5 steps from the cache)
