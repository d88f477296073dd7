"""TextEncodingStage options model authors need (issue 22): prompt_transform, a template per branch,
padding_side, combine told its branch, a max_length callback with the tokenizer, and template token counts."""
import re
from types import SimpleNamespace

import pytest
import torch

from conftest import problems_of
from diffstage.errors import StageError
from diffstage.req import FieldSpec, Req
from diffstage.stages import TextEncodingStage


@pytest.fixture(scope="module")
def t5(tiny_flux_dev):
    from transformers import AutoTokenizer, T5EncoderModel

    return SimpleNamespace(model=T5EncoderModel.from_pretrained(tiny_flux_dev, subfolder="text_encoder_2").eval(),
                           tok=AutoTokenizer.from_pretrained(tiny_flux_dev, subfolder="tokenizer_2"))


def stage(t5, callbacks=None, **options):
    enc = dict(text_encoder=t5.model, tokenizer=t5.tok, field="prompt_embeds", max_length=12, mask_field="text_mask",
               use_attention_mask=True, **options)
    s = TextEncodingStage([enc], combined_fields=["combined"] if "combine" in (callbacks or {}) else ())
    s.bind(callbacks or {}, {})
    return s


REQ = Req.with_fields([FieldSpec(f, "state") for f in ("text_mask", "negative_text_mask", "combined",
                                                       "negative_combined", "instruction_tokens")])


def request(**kw):
    return REQ(**{"prompt": ["A Red FOX  ", "a cat"], "num_images_per_prompt": 1, "do_cfg": True,
                  "negative_prompt": "blurry", **kw})


@torch.no_grad()
def encoded(t5, texts, length=12, side="right"):
    tokens = t5.tok(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt",
                    padding_side=side)
    return t5.model(tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state, tokens.attention_mask


def test_prompt_transform_runs_before_the_template_on_each_branch(t5):
    seen = []

    def lower(prompts, req, settings, negative):
        seen.append(negative)
        return [p.lower().strip() for p in prompts]

    req = stage(t5, {"prompt_transform": lower}, template="photo of {}")(request())
    assert seen == [False, True]
    assert torch.allclose(req.prompt_embeds, encoded(t5, ["photo of a red fox", "photo of a cat"])[0], atol=1e-6)
    plain = stage(t5, template="photo of {}")(request())
    assert not torch.allclose(plain.prompt_embeds[0], req.prompt_embeds[0], atol=1e-4)  # the transform mattered


def test_prompt_transform_must_return_one_string_per_prompt(t5):
    with pytest.raises(StageError, match=r"the prompt_transform callback must return a list of 2 strings \(one per "
                                         r"prompt\), got 'a red fox'"):
        stage(t5, {"prompt_transform": lambda prompts, req, settings, negative: "a red fox"})(request())


def test_negative_template_applies_to_the_negative_branch_only(t5):
    req = stage(t5, template="a photo of {}", negative_template="{}")(request(prompt="a fox"))
    assert torch.allclose(req.prompt_embeds, encoded(t5, ["a photo of a fox"])[0], atol=1e-6)
    assert torch.allclose(req.negative_prompt_embeds, encoded(t5, ["blurry"])[0], atol=1e-6)
    both = stage(t5, template="a photo of {}")(request(prompt="a fox"))  # default: the same template for both
    assert torch.allclose(both.negative_prompt_embeds, encoded(t5, ["a photo of blurry"])[0], atol=1e-6)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_side(t5, side):
    req = stage(t5, padding_side=side)(request(prompt="a fox", do_cfg=False))
    emb, mask = encoded(t5, ["a fox"], side=side)
    assert torch.equal(req.text_mask, mask) and torch.allclose(req.prompt_embeds, emb, atol=1e-6)
    assert req.text_mask[0, 0 if side == "left" else -1] == 0  # the padding is on that side


def test_combine_is_told_its_branch(t5):
    branches = []

    def combine(outputs, req, settings, negative):
        branches.append(negative)
        return {"combined": outputs["prompt_embeds"] * (2 if negative else 1)}

    req = stage(t5, {"combine": combine})(request())
    assert branches == [False, True]
    assert torch.equal(req.negative_combined, req.negative_prompt_embeds * 2)
    assert torch.equal(req.combined, req.prompt_embeds)


def test_max_length_callback_counts_with_the_tokenizer(t5):
    calls = []

    def max_length(field, tokenizer, req, settings, negative):
        calls.append((field, negative))
        instruction = len(tokenizer("describe the image:").input_ids)
        return None if negative else instruction + 8  # the instruction does not use up the prompt's tokens

    req = stage(t5, {"max_length": max_length}, template="describe the image: {}")(request())
    n = len(t5.tok("describe the image:").input_ids)
    assert calls == [("prompt_embeds", False), ("prompt_embeds", True)]
    assert req.prompt_embeds.shape[1] == n + 8 and req.negative_prompt_embeds.shape[1] == 12  # None: as configured
    with pytest.raises(StageError, match=r"the max_length callback must return a positive int or None, got 0 "
                                         r"\(for text encoder '.*'\)"):
        stage(t5, {"max_length": lambda field, tokenizer, req, settings, negative: 0})(request())


def test_template_tokens_field_counts_the_prefix_for_later_callbacks(t5):
    req = stage(t5, template="describe the image: {}", template_tokens_field="instruction_tokens")(request())
    whole = t5.tok("describe the image: a red fox").input_ids  # T5 adds </s> at the end only
    prompt = t5.tok("a red fox", add_special_tokens=False).input_ids
    assert whole[req.instruction_tokens:req.instruction_tokens + len(prompt)] == prompt
    assert req.instruction_tokens == len(t5.tok("describe the image:", add_special_tokens=False).input_ids) > 1
    contract = TextEncodingStage.contract({"encoders": [dict(text_encoder="te", tokenizer="tok", field="emb",
                                                             template="x: {}", template_tokens_field="n_tokens")]})
    assert "n_tokens" in contract.writes and "n_tokens" in contract.declares


def test_template_tokens_reach_model_inputs_in_the_check(flux_yaml_variant):
    # a denoising callback that reads the count passes the check when an encoder writes it, and not otherwise
    from diffstage import check_model

    allow = ["diffstage.", "diffusers.", "transformers.", "torch.", "test_text_encoding_options."]
    reader = ("model_inputs: diffstage.models.flux.callbacks.model_inputs",
              "model_inputs: test_text_encoding_options.model_inputs_reading_count")
    path = flux_yaml_variant(("        output: last_hidden_state\n",
                              "        output: last_hidden_state\n        template: 'a photo of {}'\n"
                              "        template_tokens_field: prefix_tokens\n"), reader)
    check_model(path, allowlist=allow)
    unwritten = flux_yaml_variant(reader, name="no_count.yaml")
    assert ["reads 'prefix_tokens'" in p.message for p in problems_of(unwritten, allowlist=allow)] == [True]


@pytest.mark.parametrize("extra, message", [
    ({"negative_template": "'none'"}, "negative_template must contain '{}' exactly once (where the prompt goes)"),
    ({"template_tokens_field": "n"}, "template_tokens_field counts the tokens of `template`: set a template"),
    ({"padding_side": "middle"}, "Input should be 'left' or 'right'"),
])
def test_new_options_are_checked(flux_yaml_variant, extra, message):
    line = "        output: pooler_output\n"
    path = flux_yaml_variant((line, line + "".join(f"        {k}: {v}\n" for k, v in extra.items())))
    problems = problems_of(path)
    assert len(problems) == 1 and message in problems[0].message, problems


from diffstage.callbacks import reads  # noqa: E402
from diffstage.models.flux.callbacks import model_inputs as flux_inputs  # noqa: E402


@reads("latents", "image_position_ids", "prefix_tokens", optional=("guidance_scale",))
def model_inputs_reading_count(req, settings, transformer, negative):
    return flux_inputs(req, settings, transformer, negative)


def test_an_empty_second_prompt_falls_back_to_the_prompt(tiny_flux_dev):
    # Diffusers: prompt_2 = prompt_2 or prompt (SD3, SDXL, FLUX), negative_prompt_2 likewise
    assert TextEncodingStage.texts(Req(prompt="a fox", prompt_2=""), "prompt_2", "prompt", 2) == ["a fox"] * 2
    assert TextEncodingStage.texts(Req(prompt="a fox", prompt_2=[]), "prompt_2", "prompt", 1) == ["a fox"]
    assert TextEncodingStage.texts(Req(prompt="a fox", prompt_2="a cat"), "prompt_2", "prompt", 1) == ["a cat"]
    assert TextEncodingStage.texts(Req(prompt=""), "prompt", "prompt", 1) == [""]  # the prompt itself stays


def test_template_tokens_count_a_start_token_and_not_an_end_token(tiny_flux_dev):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tiny_flux_dev, subfolder="tokenizer")  # <|startoftext|> ... <|endoftext|>
    n = TextEncodingStage.template_tokens({"tokenizer": tok, "template": "a photo of {}"})
    assert n == 1 + len(tok("a photo of", add_special_tokens=False).input_ids)
    assert tok("a photo of a red fox").input_ids[n:n + 3] == tok("a red fox", add_special_tokens=False).input_ids


def test_max_length_callback_is_held_to_the_encoder_limit(t5):
    limit = t5.model.config.n_positions if hasattr(t5.model.config, "n_positions") else None
    from diffstage.errors import RequestError
    from diffstage.stages.encoder_config import length_limit

    most, where = length_limit({"text_encoder": t5.model, "tokenizer": t5.tok})
    with pytest.raises(RequestError, match=rf"text encoder '.*' would take {most + 1} tokens \(its max_length "
                                           rf"callback, for this request\), but it handles at most {most} "
                                           rf"\({re.escape(where)}\)"):
        stage(t5, {"max_length": lambda field, tokenizer, req, settings, negative: most + 1})(request())
    assert limit is None or limit == most


def test_extra_outputs_come_from_the_same_call(tiny_flux_dev):
    from transformers import CLIPTextModel, CLIPTokenizer

    clip = CLIPTextModel.from_pretrained(tiny_flux_dev, subfolder="text_encoder").eval()
    tok = CLIPTokenizer.from_pretrained(tiny_flux_dev, subfolder="tokenizer")
    calls = []
    clip.register_forward_hook(lambda module, args, out: calls.append(1))
    cls = Req.with_fields([FieldSpec(f, "state") for f in ("hidden", "pooled", "negative_hidden", "negative_pooled")])
    one = TextEncodingStage([dict(text_encoder=clip, tokenizer=tok, hidden_layer=-2, field="hidden",
                                  extra_outputs={"pooler_output": "pooled"})])
    one.bind({}, {})
    req = one(cls(prompt=["a red fox", "a cat"], num_images_per_prompt=2, do_cfg=True))
    assert len(calls) == 2  # one call a branch
    two = TextEncodingStage([dict(text_encoder=clip, tokenizer=tok, hidden_layer=-2, field="hidden"),
                             dict(text_encoder=clip, tokenizer=tok, output="pooler_output", field="pooled")])
    two.bind({}, {})
    apart = two(cls(prompt=["a red fox", "a cat"], num_images_per_prompt=2, do_cfg=True))
    for name in ("hidden", "pooled", "negative_hidden", "negative_pooled"):
        assert torch.equal(getattr(req, name), getattr(apart, name)), name
    assert req.pooled.shape == (4, 32)
    contract = TextEncodingStage.contract({"encoders": [dict(text_encoder="te", tokenizer="tok", field="emb",
                                                             extra_outputs={"text_embeds": "emb_pooled"})]})
    assert {"emb", "emb_pooled"} <= contract.writes and "negative_emb_pooled" in contract.optional_writes


def test_extra_outputs_are_checked(flux_yaml_variant):
    line = "        output: pooler_output\n"
    for extra, message in (("{hidden_states: h}", "extra_outputs: hidden_states is one tensor per layer"),
                           ("{text_embeds: pooled_prompt_embeds}", "field, mask_field and extra_outputs must name "
                                                                   "different fields")):
        path = flux_yaml_variant((line, line + f"        extra_outputs: {extra}\n"), name=f"m{len(extra)}.yaml")
        problems = problems_of(path)
        assert len(problems) == 1 and message in problems[0].message, problems
