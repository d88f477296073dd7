"""TextEncodingStage: run one or more text encoders and store each output in a Req field."""
from __future__ import annotations

import inspect
from dataclasses import replace
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from diffstage.errors import StageError
from diffstage.req import Req
from diffstage.stage import CallbackSpec, Contract, PipelineStage
from diffstage.images import open_image
from diffstage.torch_utils import module_device, module_dtype


class EncoderConfig(BaseModel):
    """One text encoder, as configured in the YAML."""

    model_config = ConfigDict(extra="forbid")
    text_encoder: str  # module name
    tokenizer: str  # module name
    field: str  # Req field the embeddings go to; negatives go to "negative_<field>"
    output: str = "last_hidden_state"  # attribute of the encoder output: pooler_output, last_hidden_state, ...
    hidden_layer: int | None = None  # take hidden_states[hidden_layer] instead (-2: the penultimate layer)
    max_length: Annotated[int, Field(ge=1)] | None = None  # fixed token length; default: tokenizer.model_max_length
    max_length_field: Literal["max_sequence_length"] | None = None  # take the length from the request instead
    prompt_field: str = "prompt"  # request field with this encoder's prompt; prompt when that is unset
    negative_prompt_field: str = "negative_prompt"  # likewise for the negative prompt
    template: str | None = None  # the text around each prompt, which goes where "{}" is (a chat template)
    padding: Literal["max_length", "longest"] = "max_length"  # longest: pad to the longest prompt of the batch
    mask_field: str | None = None  # Req field for the attention mask (1 = token, 0 = padding)
    use_attention_mask: bool = False  # pass the mask to the encoder (masked T5 conditioning needs it)
    # Req field with an image the encoder sees with every prompt (a vision-language encoder): `tokenizer`
    # then names its processor, called with text= and images=, and what it returns beyond the tokens
    # (pixel values, image grids) goes to the encoder too. The prompt (or template) places the image.
    image_field: str | None = None

    @model_validator(mode="after")
    def _one_output(self):
        if self.hidden_layer is not None and self.output != "last_hidden_state":
            raise ValueError("set either `output` or `hidden_layer`, not both")
        if self.output == "hidden_states" and self.hidden_layer is None:
            raise ValueError("output 'hidden_states' is one tensor per layer: set hidden_layer (e.g. -2) instead")
        if self.template is not None and self.template.count("{}") != 1:
            raise ValueError("template must contain '{}' exactly once (where the prompt goes)")
        if self.image_field is not None and self.padding != "longest":
            raise ValueError("an encoder with image_field pads to the longest prompt: set padding: longest")
        return self


POSITION_KEYS = ("max_position_embeddings", "n_positions")  # sizes of an encoder's position table


def _known(n) -> int | None:
    # tokenizers without a limit report a huge sentinel (1e30)
    return int(n) if isinstance(n, int) and not isinstance(n, bool) and 0 < n < 10 ** 7 else None


def length_limit(enc: dict) -> tuple[int, str] | None:
    """Most tokens an encoder takes, and where that comes from (None before modules are bound, as when the
    builder checks a request early). The encoder's position table is the limit; a tokenizer's model_max_length
    is advice (a model may run 1024 + 34 template tokens through a tokenizer advising 1024), used only for
    encoders without a position table (relative positions) to keep a length bound at all."""
    config = getattr(enc.get("text_encoder"), "config", None)
    configs = [config, *([config.get_text_config()] if hasattr(config, "get_text_config") else [])]
    for key in POSITION_KEYS:
        for c in configs:
            if (n := _known(getattr(c, key, None))) is not None:
                return n, f"its {key}"
    n = _known(getattr(enc.get("tokenizer"), "model_max_length", None))
    return (n, "its tokenizer's model_max_length; the encoder has no position table") if n is not None else None


def enc_name(enc: dict) -> str:
    return enc["text_encoder"] if isinstance(enc.get("text_encoder"), str) else enc.get("field", "?")


class TextEncodingStage(PipelineStage):
    """Encodes `prompt` (and `negative_prompt` when CFG runs) with each configured encoder.

    Args:
        encoders: one entry per encoder call (see EncoderConfig).
        combined_fields: fields the `combine` callback makes from the encoders' outputs
            (e.g. three encoders joined into prompt_embeds and pooled_prompt_embeds).
    """

    reads = ("prompt", "do_cfg")
    optional_reads = ("prompt_2", "negative_prompt", "max_sequence_length", "num_images_per_prompt")
    reusable = True  # deterministic in what it reads: a sweep over seeds encodes each prompt once
    callback_specs = (
        CallbackSpec("combine", ("outputs", "req", "settings"),
                     doc="takes {field: tensor} of one prompt branch and returns {field: tensor} for each of "
                         "`combined_fields` (required when combined_fields is set)"),
    )

    def __init__(self, encoders: list[EncoderConfig], combined_fields: list[str] = ()):
        super().__init__()
        self.combined_fields = list(combined_fields)
        defaults = {n: f.default for n, f in EncoderConfig.model_fields.items() if not f.is_required()}
        self.encoders = [{**defaults, **(e if isinstance(e, dict) else e.model_dump())} for e in encoders]
        for i, enc in enumerate(self.encoders):
            limit, fixed = length_limit(enc), enc.get("max_length")
            if fixed is not None and limit is not None and fixed > limit[0]:
                raise ValueError(f"encoders[{i}].max_length is {fixed}, but this encoder handles at most {limit[0]} "
                                 f"tokens ({limit[1]})")

    def request_problems(self, req: Req) -> list[str]:
        problems = []
        for enc in self.encoders:
            name, limit = enc.get("max_length_field"), length_limit(enc)
            value = getattr(req, name) if name else None
            if isinstance(value, int) and limit is not None and value > limit[0]:
                problems.append(f"{name} is {value}, but text encoder '{enc_name(enc)}' handles at most {limit[0]} "
                                f"tokens ({limit[1]})")
        return problems

    @classmethod
    def contract(cls, args) -> Contract:
        configs = [EncoderConfig.model_validate(e) for e in args.get("encoders", [])]
        if not configs:
            raise ValueError("`encoders` must list at least one encoder")
        writes, negatives, modules, declares, images = set(), set(), {}, {}, set()
        reads = set(cls.optional_reads)
        for i, c in enumerate(configs):
            outputs = [(c.field, f"output '{c.hidden_layer if c.hidden_layer is not None else c.output}' of "
                                 f"text encoder '{c.text_encoder}'")]
            if c.mask_field:
                outputs.append((c.mask_field, f"attention mask of text encoder '{c.text_encoder}'"))
            for f, doc in outputs:
                for name, what in ((f, doc), (f"negative_{f}", doc + " for the negative prompt")):
                    if name in Req.request_fields():
                        raise ValueError(f"encoders[{i}]: '{name}' is a request field; encoder outputs go to "
                                         "state fields")
                    if name not in Req.state_fields():  # a new field, e.g. a third encoder's output
                        declares[name] = what
                writes.add(f)
                negatives.add(f"negative_{f}")
            reads |= {c.prompt_field, c.negative_prompt_field}
            images |= {c.image_field} if c.image_field else set()
            modules[("encoders", i, "text_encoder")] = c.text_encoder
            modules[("encoders", i, "tokenizer")] = c.tokenizer
        combined = list(args.get("combined_fields") or ())
        for f in combined:
            for name in (f, f"negative_{f}"):
                if name in Req.request_fields():
                    raise ValueError(f"combined_fields: '{name}' is a request field")
                if name not in Req.state_fields():
                    declares[name] = "made by the `combine` callback" + (" for the negative prompt" if name != f else "")
            writes.add(f)
            negatives.add(f"negative_{f}")
        combine = replace(cls.callback_specs[0], required=bool(combined))
        return Contract(reads=frozenset(cls.reads) | images, writes=frozenset(writes), optional_writes=frozenset(negatives),
                        optional_reads=frozenset(reads), modules=modules, declares=declares, callbacks=(combine,))

    def required_reads(self) -> tuple[str, ...]:
        return tuple(self.reads) + tuple(e["image_field"] for e in self.encoders if e.get("image_field"))

    def guaranteed_writes(self) -> tuple[str, ...]:
        return tuple(f for e in self.encoders for f in (e["field"], e.get("mask_field")) if f) \
            + tuple(self.combined_fields)

    @staticmethod
    def default_combine(outputs, req, settings):
        return {}

    @torch.no_grad()
    def encode(self, enc: dict, prompts: list[str], req: Req) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings, attention mask) of `prompts`, one copy per image."""
        tokenizer, encoder = enc["tokenizer"], enc["text_encoder"]
        if enc.get("template"):
            prompts = [enc["template"].replace("{}", p) for p in prompts]
        extra = {}
        if enc.get("image_field"):
            # The processor expands the image into vision tokens; truncating (unless asked) could cut them off.
            image = open_image(getattr(req, enc["image_field"]), enc["image_field"])
            limit = {"max_length": enc["max_length"], "truncation": True} if enc.get("max_length") else {}
            tokens = tokenizer(text=prompts, images=[image] * len(prompts), padding=True, return_tensors="pt",
                               **limit)
            accepted = inspect.signature(encoder.forward).parameters
            extra = {k: v for k, v in tokens.items() if k not in ("input_ids", "attention_mask") and k in accepted}
        else:
            if enc.get("max_length_field"):
                max_length = getattr(req, enc["max_length_field"])
            else:
                max_length = enc.get("max_length") or tokenizer.model_max_length
            tokens = tokenizer(prompts, padding=True if enc.get("padding") == "longest" else "max_length",
                               max_length=max_length, truncation=True, return_tensors="pt")
        device = module_device(encoder)
        mask = tokens["attention_mask"] if "attention_mask" in tokens else torch.ones_like(tokens["input_ids"])
        layer = enc.get("hidden_layer")
        extra = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in extra.items()}
        out = encoder(tokens["input_ids"].to(device), attention_mask=mask.to(device)
                      if enc.get("use_attention_mask") else None,
                      output_hidden_states=layer is not None, **extra)
        emb = out.hidden_states[layer] if layer is not None else getattr(out, enc["output"])
        emb = emb.to(dtype=module_dtype(encoder))
        # one copy per image, keeping each prompt's copies together (as Diffusers does)
        n = req.num_images_per_prompt
        return emb.repeat_interleave(n, dim=0), mask.to(device).repeat_interleave(n, dim=0)

    @staticmethod
    def texts(req: Req, name: str, fallback: str, count: int) -> list[str] | None:
        """The prompts in request field `name` (`fallback` when unset), one per prompt; None if both unset."""
        value = getattr(req, name)
        value = getattr(req, fallback) if value is None else value
        if value is None:
            return None
        return [value] * count if isinstance(value, str) else list(value)

    def forward(self, req: Req) -> Req:
        count = len(req.prompts())
        for enc in self.encoders:
            runs = [("", self.texts(req, enc["prompt_field"], "prompt", count))]
            if req.do_cfg:  # the empty prompt when no negative prompt is given
                runs.append(("negative_", self.texts(req, enc["negative_prompt_field"], "negative_prompt", count)
                             or [""] * count))
            for prefix, texts in runs:
                emb, mask = self.encode(enc, texts, req)
                setattr(req, prefix + enc["field"], emb)
                if enc.get("mask_field"):
                    setattr(req, prefix + enc["mask_field"], mask)
        if self.combined_fields:
            for prefix in ("", "negative_") if req.do_cfg else ("",):
                self.combine(req, prefix)
        return req

    def combine(self, req: Req, prefix: str) -> None:
        """Run the `combine` callback on one branch's encoder outputs and store what it returns."""
        names = [f for e in self.encoders for f in (e["field"], e.get("mask_field")) if f]
        made = self.callback("combine")({n: getattr(req, prefix + n) for n in names}, req, self.settings)
        if not isinstance(made, dict) or sorted(made) != sorted(self.combined_fields):
            got = sorted(made) if isinstance(made, dict) else type(made).__name__
            raise StageError(f"TextEncodingStage: the combine callback must return a dict with the keys "
                             f"{sorted(self.combined_fields)} (combined_fields), got {got}")
        for name, value in made.items():
            setattr(req, prefix + name, value)
