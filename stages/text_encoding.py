"""TextEncodingStage: run one or more text encoders and store each output in a Req field."""
from __future__ import annotations

import inspect
from dataclasses import replace

import torch

from diffstage.errors import RequestError, StageError, shown
from diffstage.req import Req
from diffstage.stage import CallbackSpec, Contract, PipelineStage
from diffstage.images import open_image
from diffstage.torch_utils import module_device, module_dtype

from .encoder_config import EncoderConfig, enc_name, length_limit


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
        CallbackSpec("combine", ("outputs", "req", "settings", "negative"),
                     doc="takes {field: tensor} of one prompt branch (negative: True for the negative prompt's) "
                         "and returns {field: tensor} for each of `combined_fields` (required when "
                         "combined_fields is set)"),
        CallbackSpec("prompt_transform", ("prompts", "req", "settings", "negative"),
                     doc="returns one branch's prompts as the encoders see them, before any template, e.g. "
                         "lower-cased (default: unchanged)"),
        CallbackSpec("max_length", ("field", "tokenizer", "req", "settings", "negative"),
                     doc="returns the token length the prompts of the encoder writing `field` are padded or cut "
                         "to, or None for the configured one (e.g. an instruction's tokens plus the request's "
                         "max_sequence_length, counted with `tokenizer`)"),
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
            outputs += [(f, f"output '{o}' of text encoder '{c.text_encoder}'") for o, f in c.extra_outputs.items()]
            for f, doc in outputs:
                for name, what in ((f, doc), (f"negative_{f}", doc + " for the negative prompt")):
                    if name in Req.request_fields():
                        raise ValueError(f"encoders[{i}]: '{name}' is a request field; encoder outputs go to "
                                         "state fields")
                    if name not in Req.state_fields():  # a new field, e.g. a third encoder's output
                        declares[name] = what
                writes.add(f)
                negatives.add(f"negative_{f}")
            if c.template_tokens_field:
                name = c.template_tokens_field
                if name in Req.request_fields():
                    raise ValueError(f"encoders[{i}].template_tokens_field: '{name}' is a request field; use a "
                                     "state field")
                if name not in Req.state_fields():
                    declares[name] = f"tokens the template of text encoder '{c.text_encoder}' puts before the prompt"
                writes.add(name)
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
                        optional_reads=frozenset(reads), modules=modules, declares=declares,
                        callbacks=(combine, *cls.callback_specs[1:]))

    def required_reads(self) -> tuple[str, ...]:
        return tuple(self.reads) + tuple(e["image_field"] for e in self.encoders if e.get("image_field"))

    def guaranteed_writes(self) -> tuple[str, ...]:
        return tuple(f for e in self.encoders for f in self.output_fields(e) + (e.get("template_tokens_field"),)
                     if f) + tuple(self.combined_fields)

    @staticmethod
    def output_fields(enc: dict) -> tuple[str, ...]:
        """The fields one encoder's call fills for a branch: its embeddings, mask and extra outputs."""
        return (enc["field"], *([enc["mask_field"]] if enc.get("mask_field") else ()),
                *(enc.get("extra_outputs") or {}).values())

    @staticmethod
    def default_combine(outputs, req, settings, negative):
        return {}

    @staticmethod
    def default_prompt_transform(prompts, req, settings, negative):
        return prompts

    @staticmethod
    def default_max_length(field, tokenizer, req, settings, negative):
        return None

    def prepared(self, enc: dict, prompts: list[str], req: Req, negative: bool) -> list[str]:
        """One branch's prompts as the encoder sees them: through `prompt_transform`, then the branch's template."""
        out = self.callback("prompt_transform")(list(prompts), req, self.settings, negative)
        if not isinstance(out, (list, tuple)) or len(out) != len(prompts) or not all(isinstance(p, str) for p in out):
            raise StageError(f"TextEncodingStage: the prompt_transform callback must return a list of {len(prompts)} "
                             f"strings (one per prompt), got {shown(out)}")
        template = enc.get("negative_template") if negative and enc.get("negative_template") else enc.get("template")
        return [template.replace("{}", p) for p in out] if template else list(out)

    def token_length(self, enc: dict, req: Req, negative: bool) -> int | None:
        """The length this branch's tokens are padded or cut to: the `max_length` callback's, else the YAML's."""
        length = self.callback("max_length")(enc["field"], enc["tokenizer"], req, self.settings, negative)
        if length is None:
            if enc.get("image_field"):  # a processor: only an explicit max_length cuts (vision tokens)
                return enc.get("max_length")
            if enc.get("max_length_field"):
                return getattr(req, enc["max_length_field"])
            return enc.get("max_length") or enc["tokenizer"].model_max_length
        if not isinstance(length, int) or isinstance(length, bool) or length < 1:
            raise StageError(f"TextEncodingStage: the max_length callback must return a positive int or None, got "
                             f"{shown(length)} (for text encoder '{enc_name(enc)}')")
        limit = length_limit(enc)
        if limit is not None and length > limit[0]:  # from the request (max_sequence_length plus an instruction)
            raise RequestError(f"text encoder '{enc_name(enc)}' would take {length} tokens (its max_length callback, "
                               f"for this request), but it handles at most {limit[0]} ({limit[1]})")
        return length

    def tokenize(self, enc: dict, prompts: list[str], req: Req, negative: bool) -> dict:
        tokenizer, max_length = enc["tokenizer"], self.token_length(enc, req, negative)
        side = {"padding_side": enc["padding_side"]} if enc.get("padding_side") else {}
        if enc.get("image_field"):
            # The processor expands the image into vision tokens; truncating (unless asked) could cut them off.
            image = open_image(getattr(req, enc["image_field"]), enc["image_field"])
            limit = {"max_length": max_length, "truncation": True} if max_length else {}
            return tokenizer(text=prompts, images=[image] * len(prompts), padding=True, return_tensors="pt",
                             **limit, **side)
        return tokenizer(prompts, padding=True if enc.get("padding") == "longest" else "max_length",
                         max_length=max_length, truncation=True, return_tensors="pt", **side)

    @torch.no_grad()
    def encode(self, enc: dict, prompts: list[str], req: Req, negative: bool = False) -> dict[str, torch.Tensor]:
        """{field: tensor} of one branch's `prompts` (output_fields), one copy per image."""
        encoder = enc["text_encoder"]
        tokens = self.tokenize(enc, self.prepared(enc, prompts, req, negative), req, negative)
        accepted = inspect.signature(encoder.forward).parameters
        extra = {k: v for k, v in tokens.items() if k not in ("input_ids", "attention_mask") and k in accepted} \
            if enc.get("image_field") else {}  # pixel values, image grids
        device = module_device(encoder)
        mask = tokens["attention_mask"] if "attention_mask" in tokens else torch.ones_like(tokens["input_ids"])
        layer = enc.get("hidden_layer")
        extra = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in extra.items()}
        out = encoder(tokens["input_ids"].to(device), attention_mask=mask.to(device)
                      if enc.get("use_attention_mask") else None,
                      output_hidden_states=layer is not None, **extra)
        emb = out.hidden_states[layer] if layer is not None else getattr(out, enc["output"])
        made = {enc["field"]: emb.to(dtype=module_dtype(encoder)), enc.get("mask_field"): mask.to(device),
                **{f: getattr(out, o).to(dtype=module_dtype(encoder)) for o, f in enc["extra_outputs"].items()}}
        # one copy per image, keeping each prompt's copies together (as Diffusers does)
        n = req.num_images_per_prompt
        return {f: t.repeat_interleave(n, dim=0) for f, t in made.items() if f}

    @staticmethod
    def template_tokens(enc: dict) -> int:
        """Tokens before the prompt in `template`'s encoding, special tokens included: where the encodings of the
        template around two different prompts first differ (counting the prefix alone would count the end token
        CLIP and T5 add; a vision processor's image placeholder counts as one token)."""
        tokenizer = getattr(enc["tokenizer"], "tokenizer", enc["tokenizer"])  # a processor's own tokenizer
        a, b = (tokenizer(enc["template"].replace("{}", marker))["input_ids"] for marker in ("a", "b"))
        start = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if start is None:
            raise StageError(f"TextEncodingStage: cannot count the tokens of the template of text encoder "
                             f"'{enc_name(enc)}': its tokenizer encodes 'a' and 'b' alike")
        return start

    @staticmethod
    def texts(req: Req, name: str, fallback: str, count: int) -> list[str] | None:
        """The prompts in request field `name` (`fallback` when unset or empty, as Diffusers' `prompt_2 or
        prompt`), one per prompt; None if both unset."""
        value = getattr(req, name)
        value = getattr(req, fallback) if value is None or len(value) == 0 else value
        if value is None:
            return None
        return [value] * count if isinstance(value, str) else list(value)

    def forward(self, req: Req) -> Req:
        count = len(req.prompts())
        for enc in self.encoders:
            if enc.get("template_tokens_field"):  # set first: this stage's max_length callback may read it
                setattr(req, enc["template_tokens_field"], self.template_tokens(enc))
            runs = [("", self.texts(req, enc["prompt_field"], "prompt", count))]
            if req.do_cfg:  # the empty prompt when no negative prompt is given
                runs.append(("negative_", self.texts(req, enc["negative_prompt_field"], "negative_prompt", count)
                             or [""] * count))
            for prefix, texts in runs:
                for name, value in self.encode(enc, texts, req, negative=bool(prefix)).items():
                    setattr(req, prefix + name, value)
        if self.combined_fields:
            for prefix in ("", "negative_") if req.do_cfg else ("",):
                self.combine(req, prefix)
        return req

    def combine(self, req: Req, prefix: str) -> None:
        """Run the `combine` callback on one branch's encoder outputs and store what it returns."""
        names = [f for e in self.encoders for f in self.output_fields(e)]
        made = self.callback("combine")({n: getattr(req, prefix + n) for n in names}, req, self.settings, bool(prefix))
        if not isinstance(made, dict) or sorted(made) != sorted(self.combined_fields):
            got = sorted(made) if isinstance(made, dict) else type(made).__name__
            raise StageError(f"TextEncodingStage: the combine callback must return a dict with the keys "
                             f"{sorted(self.combined_fields)} (combined_fields), got {got}")
        for name, value in made.items():
            setattr(req, prefix + name, value)
