"""Each standard stage alone: constructed directly, bound, run on a hand-built Req."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import problems_of
from diffstage import DiffstageError, FieldSpec, PipelineStage, Req, RequestError, check_model
from diffstage.models.flux import callbacks as flux
from diffstage.models.flux.tiny import SCHEDULERS
from diffstage.stage import CallbackSpec
from diffstage.stages import (DecodingStage, DenoisingStage, InputValidationStage, LatentPreparationStage,
                              TextEncodingStage, TimestepPreparationStage)
from diffstage.stages.decoding import to_pil


def bound(stage, callbacks=None, settings=None):
    stage.bind(callbacks or {}, settings or {})
    return stage


def seeded(seed):
    return torch.Generator("cpu").manual_seed(seed)


@pytest.fixture(scope="module")
def tiny(tiny_flux_dev):
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTokenizer, T5EncoderModel

    p = tiny_flux_dev
    return SimpleNamespace(
        clip=CLIPTextModel.from_pretrained(p, subfolder="text_encoder").eval(),
        clip_tok=CLIPTokenizer.from_pretrained(p, subfolder="tokenizer"),
        t5=T5EncoderModel.from_pretrained(p, subfolder="text_encoder_2").eval(),
        t5_tok=AutoTokenizer.from_pretrained(p, subfolder="tokenizer_2"),
        transformer=FluxTransformer2DModel.from_pretrained(p, subfolder="transformer"),
        vae=AutoencoderKL.from_pretrained(p, subfolder="vae"))


# --- PipelineStage base -------------------------------------------------------------------------------------------
class Echo(PipelineStage):
    reads = ("latents",)
    writes = ("output",)

    def forward(self, req):
        req.output = req.latents
        return req


class ReturnsNone(PipelineStage):
    def forward(self, req):
        return None


class Hooked(PipelineStage):
    callback_specs = (CallbackSpec("f", ("x",), required=True), CallbackSpec("g", ("x",)))

    @staticmethod
    def default_g(x):
        return x


def test_base_missing_read_names_stage_and_field():
    with pytest.raises(RequestError) as e:
        Echo()(Req())
    assert str(e.value) == "Echo: required field 'latents' is not set on the request"
    assert Echo()(Req(latents=5)).output == 5


def test_base_forward_must_return_req():
    with pytest.raises(TypeError, match=r"^ReturnsNone.forward must return the Req, got NoneType$"):
        ReturnsNone()(Req())


def test_base_bind_fills_defaults_and_settings():
    f = lambda x: x + 1  # noqa: E731
    stage = bound(Hooked(), {"f": f}, {"alpha": 2})
    # bound callbacks are wrapped so a failure names them; the wrapper keeps the original
    assert stage.callback("f").__wrapped__ is f and stage.callback("g").__wrapped__ is Hooked.default_g
    assert stage.settings.alpha == 2
    with pytest.raises(AttributeError, match="pipeline_config.settings has no 'beta'"):
        stage.settings.beta


@pytest.mark.parametrize("stage, name", [
    (Hooked(), "f"),
    (DenoisingStage(transformer=None, scheduler=None), "model_inputs"),
    (LatentPreparationStage(transformer=None, vae=None), "latent_shape"),
])
def test_base_bind_missing_required_callback(stage, name):
    with pytest.raises(DiffstageError, match=rf"^{type(stage).__name__}: required callback '{name}' is not set$"):
        stage.bind({}, {})


def test_base_declared_write_not_set_is_reported():
    class ForgetsOutput(Echo):
        def forward(self, req):
            return req

    with pytest.raises((RequestError, RuntimeError), match="output"):
        ForgetsOutput()(Req(latents=1))


# --- InputValidationStage -----------------------------------------------------------------------------------------
def valid(**kw):
    return Req(**{"prompt": "a red fox", "num_inference_steps": 4, "height": 32, "width": 32, **kw})


def test_validation_batch_size_and_seeded_generator():
    req = InputValidationStage()(valid(prompt=["a", "b"], num_images_per_prompt=3, seed=1234))
    assert req.batch_size == 6 and req.seed == 1234
    assert torch.equal(torch.randn(3, generator=req.generator), torch.randn(3, generator=seeded(1234)))


def test_validation_seed_none_records_the_seed_used():
    a, b = InputValidationStage()(valid()), InputValidationStage()(valid())
    assert isinstance(a.seed, int) and a.seed != b.seed
    assert torch.equal(torch.randn(3, generator=a.generator), torch.randn(3, generator=seeded(a.seed)))


@pytest.mark.parametrize("negative, scale, needs_negative, do_cfg, cfg_scale", [
    (None, 2.5, True, False, 2.5),
    ("blurry", 2.5, True, True, 2.5),
    ("blurry", 1.0, True, False, 1.0),
    ("blurry", None, True, False, 1.0),
    (None, 2.5, False, True, 2.5),
    (None, 0.5, False, False, 0.5),
])
def test_validation_cfg_decision(negative, scale, needs_negative, do_cfg, cfg_scale):
    stage = InputValidationStage(cfg_scale_field="true_cfg_scale", cfg_needs_negative_prompt=needs_negative)
    req = stage(valid(negative_prompt=negative, true_cfg_scale=scale, guidance_scale=7.0))  # guidance ignored
    assert req.do_cfg is do_cfg and req.cfg_scale == cfg_scale and isinstance(req.cfg_scale, float)


def test_validation_default_cfg_field_is_guidance_scale():
    req = InputValidationStage()(valid(negative_prompt="blurry", guidance_scale=7, true_cfg_scale=1.0))
    assert req.do_cfg is True and req.cfg_scale == 7.0


def test_validation_collects_every_problem_in_one_error():
    stage = InputValidationStage(multiple_of=16, max_steps=50, max_sequence_length_limit=64)
    req = valid(prompt=["a", 3], height=30, width=0, num_inference_steps=51, guidance_scale=-1,
                max_sequence_length=100, num_images_per_prompt=0, output_type="gif", negative_prompt=["x"], seed=1.5)
    with pytest.raises(RequestError) as e:
        stage(req)
    assert str(e.value).splitlines() == [
        "invalid request:",
        "  - prompt must be a string or a non-empty list of strings, got ['a', 3]",
        "  - negative_prompt must be a string or a list of strings as long as prompt, got ['x']",
        "  - height must be a positive multiple of 16 (at most 65536), got 30",
        "  - width must be a positive multiple of 16 (at most 65536), got 0",
        "  - num_inference_steps must be an integer in [1, 50], got 51",
        "  - guidance_scale must be a number in [0, 1000], got -1",
        "  - max_sequence_length must be an integer in [1, 64], got 100",
        "  - num_images_per_prompt must be an integer in [1, 4096], got 0",
        "  - output_type must be one of pil, np, pt, latent, got 'gif'",
        "  - seed must be an integer in [-2**63, 2**64 - 1], got 1.5",
    ]
    assert req.batch_size is None and req.generator is None  # nothing written


@pytest.mark.parametrize("kw, message", [
    (dict(prompt=[]), "prompt must be a string or a non-empty list of strings, got []"),
    (dict(height=True), "height must be a positive multiple of 1 (at most 65536), got True"),
    (dict(num_inference_steps=2.0), "num_inference_steps must be an integer in [1, 1000], got 2.0"),
    (dict(seed=True), "seed must be an integer in [-2**63, 2**64 - 1], got True"),
    (dict(true_cfg_scale="2"), "true_cfg_scale must be a number in [0, 1000], got '2'"),
])
def test_validation_single_problem(kw, message):
    with pytest.raises(RequestError) as e:
        InputValidationStage()(valid(**kw))
    assert str(e.value) == f"invalid request:\n  - {message}"


def test_validation_missing_fields_are_reported_with_the_rest():
    with pytest.raises(RequestError) as e:
        InputValidationStage()(valid(prompt=None, height=None, num_inference_steps=0))
    assert str(e.value).splitlines() == [
        "invalid request:",
        "  - prompt must be a string or a non-empty list of strings, got None",
        "  - height must be a positive multiple of 1 (at most 65536), got None",
        "  - num_inference_steps must be an integer in [1, 1000], got 0",
    ]


def test_validation_rejects_prompt_2_of_wrong_length():
    with pytest.raises(RequestError, match="prompt_2"):
        InputValidationStage()(valid(prompt=["a", "b"], prompt_2=["c"]))


@pytest.mark.parametrize("field", ["num_images_per_prompt", "max_sequence_length", "true_cfg_scale"])
def test_validation_rejects_bool(field):
    with pytest.raises(RequestError, match=field):
        InputValidationStage()(valid(**{field: True}))


# --- TextEncodingStage --------------------------------------------------------------------------------------------
FLUX_ENCODERS = [
    dict(text_encoder="text_encoder", tokenizer="tokenizer", output="pooler_output", field="pooled_prompt_embeds"),
    dict(text_encoder="text_encoder_2", tokenizer="tokenizer_2", max_length_field="max_sequence_length",
         prompt_field="prompt_2", field="prompt_embeds"),
]


def text_stage(tiny):
    mods = {"text_encoder": tiny.clip, "tokenizer": tiny.clip_tok,
            "text_encoder_2": tiny.t5, "tokenizer_2": tiny.t5_tok}
    encoders = [{**e, "text_encoder": mods[e["text_encoder"]], "tokenizer": mods[e["tokenizer"]]}
                for e in FLUX_ENCODERS]
    return bound(TextEncodingStage(encoders))


def clip_pooled(tiny, texts):
    ids = tiny.clip_tok(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    return tiny.clip(ids).pooler_output


def t5_seq(tiny, texts, n=16):
    ids = tiny.t5_tok(texts, padding="max_length", max_length=n, truncation=True, return_tensors="pt").input_ids
    return tiny.t5(ids).last_hidden_state


def text_req(**kw):
    return Req(**{"prompt": ["a red fox", "a blue cat"], "num_images_per_prompt": 2, "batch_size": 4,
                  "do_cfg": False, "max_sequence_length": 16, **kw})


@torch.no_grad()
def test_text_encoding_shapes_values_and_repeat(tiny):
    req = text_stage(tiny)(text_req(negative_prompt="blurry"))
    assert req.pooled_prompt_embeds.shape == (4, 32) and req.prompt_embeds.shape == (4, 16, 32)
    pooled, seq = clip_pooled(tiny, ["a red fox", "a blue cat"]), t5_seq(tiny, ["a red fox", "a blue cat"])
    assert torch.allclose(req.pooled_prompt_embeds, pooled.repeat_interleave(2, 0), atol=1e-6)
    assert torch.allclose(req.prompt_embeds, seq.repeat_interleave(2, 0), atol=1e-6)
    assert not torch.allclose(pooled[0], pooled[1])
    assert req.negative_prompt_embeds is None and req.negative_pooled_prompt_embeds is None  # no CFG


@torch.no_grad()
@pytest.mark.parametrize("negative, text", [("blurry", "blurry"), (None, "")])
def test_text_encoding_negatives_with_cfg(tiny, negative, text):
    req = text_stage(tiny)(text_req(do_cfg=True, negative_prompt=negative))
    assert req.negative_prompt_embeds.shape == (4, 16, 32)
    assert torch.allclose(req.negative_pooled_prompt_embeds, clip_pooled(tiny, [text]).expand(4, -1), atol=1e-6)
    assert torch.allclose(req.negative_prompt_embeds, t5_seq(tiny, [text]).expand(4, -1, -1), atol=1e-6)


@torch.no_grad()
def test_text_encoding_prompt_2_goes_to_its_encoder(tiny):
    req = text_stage(tiny)(text_req(prompt="a red fox", prompt_2="a blue cat", num_images_per_prompt=1, batch_size=1))
    assert torch.allclose(req.pooled_prompt_embeds, clip_pooled(tiny, ["a red fox"]), atol=1e-6)
    assert torch.allclose(req.prompt_embeds, t5_seq(tiny, ["a blue cat"]), atol=1e-6)


@torch.no_grad()
def test_text_encoding_hidden_layer_and_attention_mask(tiny):
    clip = dict(text_encoder=tiny.clip, tokenizer=tiny.clip_tok, field="clip_hidden", hidden_layer=-2, max_length=8)
    t5 = dict(text_encoder=tiny.t5, tokenizer=tiny.t5_tok, field="prompt_embeds", max_length=16,
              mask_field="text_mask", use_attention_mask=True)
    cls = Req.with_fields([FieldSpec(f, "state") for f in ("clip_hidden", "text_mask", "negative_text_mask",
                                                           "negative_clip_hidden")])
    req = bound(TextEncodingStage([clip, t5]))(cls(prompt=["a red fox", "a cat"], num_images_per_prompt=1,
                                                    do_cfg=True))
    ids = tiny.clip_tok(["a red fox", "a cat"], padding="max_length", max_length=8, truncation=True,
                        return_tensors="pt").input_ids
    assert torch.allclose(req.clip_hidden, tiny.clip(ids, output_hidden_states=True).hidden_states[-2], atol=1e-6)
    tokens = tiny.t5_tok(["a red fox", "a cat"], padding="max_length", max_length=16, truncation=True,
                         return_tensors="pt")
    assert torch.equal(req.text_mask, tokens.attention_mask) and req.text_mask.sum() < req.text_mask.numel()
    masked = tiny.t5(tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
    assert torch.allclose(req.prompt_embeds, masked, atol=1e-6)
    assert not torch.allclose(masked, tiny.t5(tokens.input_ids).last_hidden_state, atol=1e-4)  # the mask matters
    assert req.negative_text_mask.shape == (2, 16) and req.negative_clip_hidden.shape == req.clip_hidden.shape


@pytest.mark.parametrize("extra, message", [
    ({"hidden_layer": -2, "output": "pooler_output"}, "set either `output` or `hidden_layer`, not both"),
    ({"output": "hidden_states"}, "output 'hidden_states' is one tensor per layer: set hidden_layer (e.g. -2)"),
    ({"output": "pooler_output", "template": "'no place for the prompt'"},
     "template must contain '{}' exactly once (where the prompt goes)"),
    ({"output": "pooler_output", "image_field": "image"},
     "an encoder with image_field pads to the longest prompt: set padding: longest"),
])
def test_text_encoding_output_choice_is_checked(flux_yaml_variant, extra, message):
    line = "        output: pooler_output\n"
    path = flux_yaml_variant((line, "".join(f"        {k}: {v}\n" for k, v in extra.items())))
    problems = problems_of(path)
    assert len(problems) == 1 and message in problems[0].message and problems[0].key == "stages[1].encoders[0]"


def test_text_encoding_prompt_fields_may_be_declared(flux_yaml_variant):
    path = flux_yaml_variant(("        prompt_field: prompt_2\n", "        prompt_field: prompt_3\n"))
    problems = problems_of(path)
    assert [p.message for p in problems] == ["reads 'prompt_3', which is not a Req field"]
    text = path.read_text() + "request_fields:\n  prompt_3: {type: text, doc: prompt of the third encoder}\n"
    path.write_text(text)
    assert "prompt_3" in check_model(path).req_cls.request_fields()


def test_text_encoding_fixed_and_default_max_length(tiny):
    enc = dict(text_encoder=tiny.clip, tokenizer=tiny.clip_tok, field="prompt_embeds")
    req = bound(TextEncodingStage([enc]))(text_req(max_sequence_length=None))
    assert req.prompt_embeds.shape == (4, 77, 32)  # tokenizer.model_max_length
    req = bound(TextEncodingStage([{**enc, "max_length": 8}]))(text_req())
    assert req.prompt_embeds.shape == (4, 8, 32)


def test_text_encoding_contract():
    c = TextEncodingStage.contract({"encoders": FLUX_ENCODERS})
    assert c.writes == {"pooled_prompt_embeds", "prompt_embeds"}
    assert c.optional_writes == {"negative_pooled_prompt_embeds", "negative_prompt_embeds"}  # only with CFG
    assert c.reads == {"prompt", "do_cfg"}
    assert c.optional_reads == {"prompt", "prompt_2", "negative_prompt", "max_sequence_length",
                               "num_images_per_prompt"}
    assert dict(c.modules) == {("encoders", 0, "text_encoder"): "text_encoder",
                               ("encoders", 0, "tokenizer"): "tokenizer",
                               ("encoders", 1, "text_encoder"): "text_encoder_2",
                               ("encoders", 1, "tokenizer"): "tokenizer_2"}


def test_text_encoding_contract_rejects_a_request_field():
    with pytest.raises(ValueError) as e:
        TextEncodingStage.contract({"encoders": [FLUX_ENCODERS[0], {**FLUX_ENCODERS[1], "field": "prompt"}]})
    assert str(e.value) == "encoders[1]: 'prompt' is a request field; encoder outputs go to state fields"


def test_text_encoding_contract_declares_new_fields():
    c = TextEncodingStage.contract({"encoders": [FLUX_ENCODERS[0], {**FLUX_ENCODERS[1], "field": "t5_embeds"}]})
    assert "t5_embeds" in c.writes and "negative_t5_embeds" in c.optional_writes
    assert dict(c.declares) == {
        "t5_embeds": "output 'last_hidden_state' of text encoder 'text_encoder_2'",
        "negative_t5_embeds": "output 'last_hidden_state' of text encoder 'text_encoder_2' for the negative prompt"}


def test_text_encoding_contract_needs_an_encoder():
    with pytest.raises(ValueError, match="^`encoders` must list at least one encoder$"):
        TextEncodingStage.contract({})


# --- LatentPreparationStage ---------------------------------------------------------------------------------------
FLUX_LATENT_CALLBACKS = dict(latent_shape=flux.latent_shape, pack=flux.pack, position_ids=flux.position_ids)


def test_latents_flux_shapes_noise_and_ids(tiny):
    stage = bound(LatentPreparationStage(transformer=tiny.transformer, vae=tiny.vae), FLUX_LATENT_CALLBACKS)
    req = stage(Req(height=48, width=32, batch_size=2, generator=seeded(5)))
    assert req.raw_latent_shape == (2, 4, 24, 16)  # in_channels/4, 2 * (48 // (2*2)), 2 * (32 // (2*2))
    assert req.latents.shape == (2, 12 * 8, 16) and req.latents.dtype == torch.float32
    noise = torch.randn(2, 4, 24, 16, generator=seeded(5))
    assert torch.equal(req.latents, flux.pack(noise, req, {}))
    assert torch.equal(flux.unpack(req.latents, req, {}, tiny.vae), noise)
    ids = req.image_position_ids
    assert ids.shape == (96, 3) and ids[:, 0].eq(0).all()
    assert ids[9].tolist() == [0, 1, 1] and ids[95].tolist() == [0, 11, 7]  # token k -> (0, k // 8, k % 8)


def test_latents_input_latents_used_as_given(tiny):
    stage = bound(LatentPreparationStage(transformer=tiny.transformer, vae=tiny.vae), FLUX_LATENT_CALLBACKS)
    given = torch.arange(2 * 96 * 16, dtype=torch.float64).reshape(2, 96, 16)
    gen = seeded(5)
    req = stage(Req(height=48, width=32, batch_size=2, generator=gen, input_latents=given))
    assert req.latents.dtype == torch.float32 and torch.equal(req.latents, given.float())  # not packed again
    assert req.raw_latent_shape == (2, 4, 24, 16) and req.image_position_ids.shape == (96, 3)
    assert torch.equal(torch.randn(2, generator=gen), torch.randn(2, generator=seeded(5)))  # no noise drawn


def test_latents_default_pack_and_position_ids():
    stage = bound(LatentPreparationStage(transformer=None, vae=None), {"latent_shape": lambda *a: (3, 4, 5)})
    req = stage(Req(height=8, width=8, batch_size=2, generator=seeded(1)))
    assert torch.equal(req.latents, torch.randn(2, 3, 4, 5, generator=seeded(1)))
    assert req.raw_latent_shape == (2, 3, 4, 5) and req.image_position_ids is None


def test_latents_of_any_rank_for_video():
    stage = bound(LatentPreparationStage(transformer=None, vae=None), {"latent_shape": lambda *a: (3, 2, 4, 5)})
    req = stage(Req(height=8, width=8, batch_size=2, generator=seeded(1)))
    assert req.raw_latent_shape == (2, 3, 2, 4, 5) and req.latents.shape == (2, 3, 2, 4, 5)


@pytest.mark.parametrize("shape", [(3, 0, 5), (3, 4.0, 5), "345", None, ()])
def test_latent_shape_must_be_positive_integers(shape):
    stage = bound(LatentPreparationStage(transformer=None, vae=None), {"latent_shape": lambda *a: shape})
    with pytest.raises(DiffstageError, match=r"latent_shape must return positive integers \(channels, \[frames,\] "
                                             r"height, width\) for one image, got"):
        stage(Req(height=8, width=8, batch_size=2, generator=seeded(1)))


def test_decoding_converts_videos_as_diffusers_does():
    video = torch.rand(2, 3, 5, 4, 6)  # [B, C, F, H, W]
    assert DecodingStage.convert(video, "np").shape == (2, 5, 4, 6, 3)
    assert DecodingStage.convert(video, "pt").shape == (2, 5, 3, 4, 6)
    frames = DecodingStage.convert(video, "pil")
    assert len(frames) == 2 and len(frames[0]) == 5 and frames[0][0].size == (6, 4)


# --- TimestepPreparationStage -------------------------------------------------------------------------------------
def scheduler(variant):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**SCHEDULERS[variant])


def test_timesteps_flux_sigmas_and_mu():
    stage = bound(TimestepPreparationStage(scheduler("dev")), dict(sigmas=flux.sigmas, mu=flux.mu))
    req = stage(Req(num_inference_steps=4, latents=torch.zeros(1, 96, 16)))
    slope = (1.15 - 0.5) / (4096 - 256)
    mu = 96 * slope + 0.5 - slope * 256
    assert flux.mu(req, {}, stage.scheduler) == pytest.approx(mu)
    ref = scheduler("dev")
    ref.set_timesteps(sigmas=np.linspace(1, 1 / 4, 4), mu=mu)
    assert len(req.timesteps) == 4 and req.num_inference_steps == 4
    assert torch.equal(req.timesteps, ref.timesteps) and torch.equal(req.sigmas, ref.sigmas)
    assert req.timesteps[0] == 1000 and req.sigmas[-1] == 0 and len(req.sigmas) == 5


def test_timesteps_default_uses_scheduler_spacing():
    req = bound(TimestepPreparationStage(scheduler("schnell")))(Req(num_inference_steps=4, latents=torch.zeros(1)))
    ref = scheduler("schnell")
    ref.set_timesteps(4)
    assert torch.equal(req.timesteps, ref.timesteps)
    assert req.timesteps.tolist() == pytest.approx([1000, 667, 334, 1], abs=0.5)  # not FLUX's 1000, 750, 500, 250


# --- DenoisingStage -----------------------------------------------------------------------------------------------
class FakeTransformer(torch.nn.Module):
    """Predicts the constant it is conditioned on; records every call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, hidden_states, timestep, cond, return_dict=False):
        self.calls.append((timestep.clone(), float(cond)))
        return (torch.full_like(hidden_states, float(cond)),)


class SubtractScheduler:
    def step(self, model_output, t, sample, return_dict=False):
        return (sample - model_output,)


def denoiser(scheduler=None, **callbacks):
    log = []

    def model_inputs(req, settings, transformer, negative):
        log.append(negative)
        return {"cond": req.negative_prompt_embeds if negative else req.prompt_embeds}

    stage = DenoisingStage(FakeTransformer(), scheduler or SubtractScheduler(), progress=False)
    return bound(stage, {"model_inputs": model_inputs, **callbacks}), log


def denoise_req(**kw):
    return Req(**{"latents": torch.zeros(2, 3), "timesteps": torch.tensor([1000.0, 500.0, 250.0]), "do_cfg": False,
                  "cfg_scale": 1.0, "prompt_embeds": torch.tensor(3.0), **kw})


def test_denoising_without_cfg_one_call_per_step():
    stage, log = denoiser()
    req = stage(denoise_req())
    assert log == [False] and len(stage.transformer.calls) == 3
    assert [c[1] for c in stage.transformer.calls] == [3.0] * 3
    assert torch.equal(stage.transformer.calls[1][0], torch.tensor([500.0, 500.0]))  # t for each batch item
    assert torch.equal(req.latents, torch.full((2, 3), -9.0))


def test_denoising_cfg_combines_two_calls_per_step():
    stage, log = denoiser()
    req = stage(denoise_req(do_cfg=True, cfg_scale=2.5, negative_prompt_embeds=torch.tensor(1.0)))
    assert log == [False, True]  # model inputs computed once per branch, not per step
    assert [c[1] for c in stage.transformer.calls] == [3.0, 1.0] * 3
    assert torch.equal(req.latents, torch.full((2, 3), -3 * (1 + 2.5 * (3 - 1))))


def test_denoising_custom_combine_cfg():
    stage, _ = denoiser(combine_cfg=lambda cond, uncond, scale: cond * 10 + uncond)
    req = stage(denoise_req(do_cfg=True, cfg_scale=2.5, negative_prompt_embeds=torch.tensor(1.0)))
    assert torch.equal(req.latents, torch.full((2, 3), -3 * 31.0))


def test_denoising_step_hooks_see_each_step_and_can_replace_prediction():
    stage, _ = denoiser()
    seen = []

    def record(stage_, req, i, t, pred):
        seen.append((i, float(t), float(pred[0, 0]), float(req.latents[0, 0])))

    stage.add_step_hook(lambda s, req, i, t, pred: None if i == 0 else torch.full_like(pred, 10.0))
    stage.add_step_hook(record)
    req = stage(denoise_req())
    assert seen == [(0, 1000.0, 3.0, 0.0), (1, 500.0, 10.0, -3.0), (2, 250.0, 10.0, -13.0)]
    assert torch.equal(req.latents, torch.full((2, 3), -23.0))


def test_denoising_with_flow_match_scheduler_integrates_velocity():
    sched = scheduler("dev")
    steps = bound(TimestepPreparationStage(sched), dict(sigmas=flux.sigmas, mu=flux.mu))
    req = steps(Req(num_inference_steps=4, latents=torch.zeros(1, 96, 16)))
    stage, _ = denoiser(sched)
    req = stage(denoise_req(latents=req.latents, timesteps=req.timesteps, prompt_embeds=torch.tensor(0.5)))
    assert torch.allclose(req.latents, torch.full((1, 96, 16), -0.5), atol=1e-6)  # x0 + (0 - 1) * v


class BatchTransformer(torch.nn.Module):
    """Predicts latents * cond + t/1000, per sample; records the batch of every call."""

    def __init__(self):
        super().__init__()
        self.batches = []

    def forward(self, hidden_states, timestep, cond, ids, return_dict=False):
        self.batches.append(hidden_states.shape[0])
        assert ids.shape == (5, 3)  # a shared input is passed once, not doubled
        return (hidden_states * cond[:, None] + timestep[:, None] / 1000,)


def cfg_denoiser(**stage_args):
    ids = torch.zeros(5, 3)

    def model_inputs(req, settings, transformer, negative):
        return {"cond": req.negative_prompt_embeds if negative else req.prompt_embeds, "ids": ids}

    stage = DenoisingStage(BatchTransformer(), SubtractScheduler(), progress=False, **stage_args)
    return bound(stage, {"model_inputs": model_inputs})


def cfg_req():
    return denoise_req(latents=torch.ones(2, 3), do_cfg=True, cfg_scale=3.0,
                       prompt_embeds=torch.tensor([2.0, 0.5]), negative_prompt_embeds=torch.tensor([1.0, 1.0]))


def test_denoising_cfg_batch_runs_both_branches_in_one_call():
    batched, separate = cfg_denoiser(), cfg_denoiser(cfg_batch=False)
    a, b = batched(cfg_req()).latents, separate(cfg_req()).latents
    assert batched.transformer.batches == [4] * 3 and separate.transformer.batches == [2] * 6
    assert torch.equal(a, b) and not torch.equal(a, torch.ones(2, 3))


def test_denoising_cfg_batch_falls_back_when_inputs_differ_in_shape():
    stage = cfg_denoiser()
    req = cfg_req()
    req.negative_prompt_embeds = torch.tensor([1.0])  # cannot be batched with a [2] cond input
    stage(req)
    assert stage.transformer.batches == [2] * 6  # two calls a step, as with cfg_batch off
    assert DenoisingStage.joined_inputs({"c": 1, "d": None}, {"c": 1, "d": None}, 2) == {"c": 1, "d": None}


class ScalingScheduler(SubtractScheduler):
    """Records what the stage passes: the scaled model input and the step's extra arguments."""

    init_noise_sigma = 4.0

    def __init__(self):
        self.steps = []

    def scale_model_input(self, sample, t):
        return sample / 2

    def step(self, model_output, t, sample, generator=None, eta=None, return_dict=False):
        self.steps.append((generator, eta))
        return (sample - model_output,)


def test_denoising_applies_init_sigma_scale_model_input_and_step_kwargs():
    gen = seeded(0)
    stage = bound(DenoisingStage(BatchTransformer(), ScalingScheduler(), progress=False),
                  {"model_inputs": lambda req, settings, transformer, negative:
                   {"cond": torch.tensor([1.0, 1.0]), "ids": torch.zeros(5, 3)}}, {"eta": 0.3})
    req = stage(denoise_req(latents=torch.ones(2, 3), generator=gen, timesteps=torch.tensor([0.0])))
    # latents 1 -> 4 (init_noise_sigma); the model sees 4 / 2 and predicts 2; the step subtracts it
    assert torch.equal(req.latents, torch.full((2, 3), 2.0))
    assert stage.scheduler.steps == [(gen, 0.3)]
    plain = bound(DenoisingStage(BatchTransformer(), ScalingScheduler(), progress=False, scale_model_input=False),
                  {"model_inputs": lambda req, settings, transformer, negative:
                   {"cond": torch.tensor([1.0, 1.0]), "ids": torch.zeros(5, 3)}})
    assert torch.equal(plain(denoise_req(latents=torch.ones(2, 3), timesteps=torch.tensor([0.0]))).latents,
                       torch.zeros(2, 3))


def test_denoising_postprocess_prediction_runs_with_and_without_cfg():
    seen = []

    def learned_sigma(pred, req, settings):  # e.g. PixArt: keep the first half of the channels
        seen.append(tuple(pred.shape))
        return pred[:, :3]

    class Doubled(BatchTransformer):
        def forward(self, hidden_states, timestep, cond, ids, return_dict=False):
            out = super().forward(hidden_states, timestep, cond, ids)[0]
            return (torch.cat([out, torch.full_like(out, 99.0)], dim=1),)

    for do_cfg in (False, True):
        stage = cfg_denoiser()
        stage.transformer = Doubled()
        stage._callbacks["postprocess_prediction"] = learned_sigma
        req = cfg_req()
        req.do_cfg = do_cfg
        assert stage(req).latents.shape == (2, 3)
    assert seen == [(2, 6)] * 6


def test_denoising_contract():
    c = DenoisingStage.contract({"conditioning": ["prompt_embeds", "pooled_prompt_embeds"], "transformer": "unet"})
    assert c.reads == {"latents", "timesteps", "do_cfg", "cfg_scale", "prompt_embeds", "pooled_prompt_embeds"}
    assert c.optional_reads == {"negative_prompt_embeds", "negative_pooled_prompt_embeds", "generator",
                                "latents_noised"}
    assert c.writes == {"latents"}
    assert dict(c.modules) == {("transformer",): "unet", ("scheduler",): "scheduler"}
    assert [s.name for s in c.callbacks] == ["model_inputs", "timestep_input", "latent_input", "combine_cfg", "postprocess_prediction",
                                             "step_kwargs"]
    assert DenoisingStage.contract({}).reads >= {"prompt_embeds"}


def test_denoising_missing_conditioning_field_is_a_request_error():
    stage, _ = denoiser()
    stage.conditioning = ["prompt_embeds", "pooled_prompt_embeds"]
    with pytest.raises(RequestError, match="DenoisingStage: required field 'pooled_prompt_embeds' is not set"):
        stage(denoise_req())


# --- DecodingStage ------------------------------------------------------------------------------------------------
IMAGE = torch.tensor([[[-1.5, -1.0], [0.0, -0.21]], [[1.0, 1.5], [0.2, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])[None]


class FakeVAE(torch.nn.Module):
    def __init__(self, shift=0.1, dtype=torch.float32):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1, dtype=dtype))
        self.config = SimpleNamespace(scaling_factor=0.5, shift_factor=shift)
        self.received = None

    def decode(self, latents, return_dict=False):
        self.received = latents
        return (IMAGE.to(latents.dtype),)


@pytest.mark.parametrize("shift, expected", [(0.1, 0.3 / 0.5 + 0.1), (None, 0.3 / 0.5)])
def test_decoding_default_denormalize_and_pt(shift, expected):
    vae = FakeVAE(shift, dtype=torch.float64)
    req = bound(DecodingStage(vae))(Req(latents=torch.full((1, 4, 2, 2), 0.3), output_type="pt"))
    assert vae.received.dtype == torch.float64  # moved to the VAE's dtype
    assert torch.allclose(vae.received, torch.full((1, 4, 2, 2), expected, dtype=torch.float64))
    assert req.output is req.decoded
    assert torch.allclose(req.output, (IMAGE.double() * 0.5 + 0.5).clamp(0, 1))


def test_decoding_np_and_pil():
    req = bound(DecodingStage(FakeVAE()))(Req(latents=torch.zeros(1, 4, 2, 2), output_type="np"))
    arr = req.output
    assert isinstance(arr, np.ndarray) and arr.shape == (1, 2, 2, 3)  # [B, H, W, C]
    assert arr[0, 0, 0].tolist() == [0.0, 1.0, 0.5]  # clamped, [-1, 1] -> [0, 1]
    (img,) = bound(DecodingStage(FakeVAE()))(Req(latents=torch.zeros(1, 4, 2, 2))).output  # "pil" by default
    assert img.mode == "RGB" and img.size == (2, 2)
    px = np.asarray(img)
    assert px[0, 0].tolist() == [0, 255, 128]  # 127.5 rounds (as Diffusers does), not truncates
    assert px[1, 1].tolist() == [101, 128, 128]  # (-0.21 * 0.5 + 0.5) * 255 = 100.7 -> 101
    assert to_pil(np.full((1, 2, 2, 1), 0.5))[0].mode == "L"


def test_decoding_latent_output_skips_vae():
    vae, latents = FakeVAE(), torch.randn(1, 4, 2, 2)
    req = bound(DecodingStage(vae))(Req(latents=latents, output_type="latent"))
    assert req.output is latents and vae.received is None and req.decoded is None


def test_decoding_custom_unpack():
    seen = {}

    def unpack(latents, req, settings, vae):
        seen["settings"] = settings.tag
        return latents.reshape(1, 4, 2, 2)

    vae = FakeVAE()
    packed = torch.arange(16.0).reshape(1, 4, 4)
    bound(DecodingStage(vae), {"unpack": unpack}, {"tag": "x"})(Req(latents=packed, output_type="pt"))
    assert seen == {"settings": "x"}
    assert torch.allclose(vae.received, packed.reshape(1, 4, 2, 2) / 0.5 + 0.1)


def test_base_bind_rejects_unknown_callback():
    with pytest.raises(DiffstageError, match=r"^DecodingStage takes no callback 'unpak'; it takes: denormalize, postprocess_image, unpack$"):
        DecodingStage(vae=None).bind({"unpak": print}, {})


def test_validation_one_string_applies_to_every_prompt():
    req = InputValidationStage(cfg_scale_field="true_cfg_scale")(
        valid(prompt=["a", "b", "c"], negative_prompt="", prompt_2="x", true_cfg_scale=2.0))
    assert req.do_cfg and req.batch_size == 3


def test_text_encoding_string_prompt_2_with_several_prompts(tiny):
    req = text_stage(tiny)(text_req(prompt=["a red fox", "a cat"], prompt_2="a blue cat", num_images_per_prompt=1,
                                    batch_size=2))
    assert req.prompt_embeds.shape[0] == req.pooled_prompt_embeds.shape[0] == 2
    assert torch.equal(req.prompt_embeds[0], req.prompt_embeds[1])  # both from prompt_2


def test_validation_output_size_fills_only_unset_sides():
    stage = bound(InputValidationStage(multiple_of=16), {"output_size": lambda req, settings: (64, 48)})
    req = stage(valid(height=None, width=32))
    assert (req.height, req.width) == (64, 32)  # the caller's width stands
    with pytest.raises(RequestError, match="height must be a positive multiple of 16"):
        bound(InputValidationStage(multiple_of=16))(valid(height=None))  # no callback: the sides are required


def test_validation_output_size_must_return_two_integers():
    stage = bound(InputValidationStage(), {"output_size": lambda req, settings: "big"})
    with pytest.raises(DiffstageError, match=r"the output_size callback must return \(height, width\) as two "
                                             "integers, got 'big'"):
        stage(valid(height=None))


class FakeProcessor:
    """Records its call; returns tokens, a mask, pixel values and a key the encoder does not take."""

    def __init__(self):
        self.calls = []

    def __call__(self, text, images, padding, return_tensors):
        self.calls.append((text, images, padding))
        n = len(text)
        return {"input_ids": torch.ones(n, 5, dtype=torch.long), "attention_mask": torch.ones(n, 5, dtype=torch.long),
                "pixel_values": torch.full((2, 3), 7.0), "token_types": torch.zeros(n, 5)}


class FakeVisionEncoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1))
        self.seen = {}

    def forward(self, input_ids, attention_mask=None, output_hidden_states=False, pixel_values=None):
        self.seen = {"attention_mask": attention_mask, "pixel_values": pixel_values}
        return SimpleNamespace(last_hidden_state=torch.full((input_ids.shape[0], 5, 4), float(pixel_values.sum())))


def test_text_encoding_image_field_goes_through_the_processor():
    from PIL import Image

    processor, encoder = FakeProcessor(), FakeVisionEncoder()
    stage = bound(TextEncodingStage([{"text_encoder": encoder, "tokenizer": processor, "field": "prompt_embeds",
                                      "image_field": "condition_image", "padding": "longest",
                                      "use_attention_mask": True, "template": "<img>{}"}]))
    cls = Req.with_fields([FieldSpec("condition_image", "state")])
    image = Image.new("RGB", (8, 6), (1, 2, 3))
    req = stage(cls(prompt=["a", "b"], do_cfg=False, condition_image=image, num_images_per_prompt=2))
    (texts, images, padding), = processor.calls
    assert texts == ["<img>a", "<img>b"] and padding is True
    assert len(images) == 2 and all(im.size == (8, 6) for im in images)  # the image beside every prompt
    assert torch.equal(encoder.seen["pixel_values"], torch.full((2, 3), 7.0))  # token_types: not taken, not passed
    assert encoder.seen["attention_mask"] is not None
    assert req.prompt_embeds.shape == (4, 5, 4) and float(req.prompt_embeds[0, 0, 0]) == 42.0


def test_text_encoding_image_field_is_a_read_the_check_sees(flux_yaml_variant):
    path = flux_yaml_variant(("        output: pooler_output\n",
                              "        output: pooler_output\n        image_field: condition_image\n"
                              "        padding: longest\n"))
    messages = [p.message for p in problems_of(path)]
    assert messages == ["reads 'condition_image', which is not a Req field"]


def test_denoising_latent_input_extends_what_the_transformer_sees():
    shapes = []

    class Recording(FakeTransformer):
        def forward(self, hidden_states, timestep, cond, return_dict=False):
            shapes.append(tuple(hidden_states.shape))
            return super().forward(hidden_states, timestep, cond)

    stage, _ = denoiser(latent_input=lambda latents, req, settings: torch.cat([latents, torch.zeros(2, 4)], dim=1),
                        postprocess_prediction=lambda pred, req, settings: pred[:, :req.latents.shape[1]])
    stage.transformer = Recording()
    req = stage(denoise_req())
    assert shapes == [(2, 7)] * 3  # three latent tokens plus four appended ones
    assert torch.equal(req.latents, torch.full((2, 3), -9.0))  # the appended part's prediction was dropped


def test_bound_callbacks_lists_each_callback_a_stage_takes():
    from diffstage.builder import check_model, instantiate_stage

    checked = check_model("digits")
    planned = next(p for p in checked.plan if p.cls.callback_specs and not p.contract.modules
                   and not p.cls.takes_all_modules)
    stage = instantiate_stage(planned, checked, {})
    bound = stage.bound_callbacks()
    assert set(bound) == {spec.name for spec in planned.cls.callback_specs}
    for name, fn in bound.items():
        assert fn is stage.callback(name)
    bound.clear()  # a copy: the stage keeps its callbacks
    assert stage.bound_callbacks()
