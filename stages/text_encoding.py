"""TextEncodingStage: run one or more text encoders and store each output in a Req field."""
from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from diffstage.req import Req
from diffstage.stage import Contract, PipelineStage
from diffstage.torch_utils import module_device, module_dtype


class EncoderConfig(BaseModel):
    """One text encoder, as configured in the YAML."""

    model_config = ConfigDict(extra="forbid")
    text_encoder: str  # module name
    tokenizer: str  # module name
    field: str  # Req field the embeddings go to; negatives go to "negative_<field>"
    output: str = "last_hidden_state"  # attribute of the encoder output: pooler_output, last_hidden_state, ...
    max_length: Annotated[int, Field(ge=1)] | None = None  # fixed token length; default: tokenizer.model_max_length
    max_length_field: Literal["max_sequence_length"] | None = None  # take the length from the request instead
    prompt_field: Literal["prompt", "prompt_2"] = "prompt"  # prompt_2 falls back to prompt when unset


def length_limit(enc: dict) -> int | None:
    """Most tokens an encoder takes: its tokenizer's limit and its position table, where known
    (None before modules are bound, as when the builder checks a request early)."""
    limits = [getattr(enc.get("tokenizer"), "model_max_length", None),
              getattr(getattr(enc.get("text_encoder"), "config", None), "max_position_embeddings", None)]
    # tokenizers without a limit report a huge sentinel (1e30)
    known = [int(n) for n in limits if isinstance(n, int) and not isinstance(n, bool) and 0 < n < 10 ** 7]
    return min(known) if known else None


def enc_name(enc: dict) -> str:
    return enc["text_encoder"] if isinstance(enc.get("text_encoder"), str) else enc.get("field", "?")


class TextEncodingStage(PipelineStage):
    """Encodes `prompt` (and `negative_prompt` when CFG runs) with each configured encoder."""

    reads = ("prompt", "do_cfg")
    optional_reads = ("prompt_2", "negative_prompt", "max_sequence_length")

    def __init__(self, encoders: list[EncoderConfig]):
        super().__init__()
        defaults = {"output": "last_hidden_state", "prompt_field": "prompt"}
        self.encoders = [{**defaults, **(e if isinstance(e, dict) else e.model_dump())} for e in encoders]
        for i, enc in enumerate(self.encoders):
            limit, fixed = length_limit(enc), enc.get("max_length")
            if fixed is not None and limit is not None and fixed > limit:
                raise ValueError(f"encoders[{i}].max_length is {fixed}, but this encoder handles at most {limit} tokens")

    def request_problems(self, req: Req) -> list[str]:
        problems = []
        for enc in self.encoders:
            name, limit = enc.get("max_length_field"), length_limit(enc)
            value = getattr(req, name) if name else None
            if isinstance(value, int) and limit is not None and value > limit:
                problems.append(f"{name} is {value}, but text encoder '{enc_name(enc)}' handles at most {limit} tokens")
        return problems

    @classmethod
    def contract(cls, args) -> Contract:
        configs = [EncoderConfig.model_validate(e) for e in args.get("encoders", [])]
        if not configs:
            raise ValueError("`encoders` must list at least one encoder")
        writes, negatives, modules = set(), set(), {}
        fields = Req.state_fields()
        for i, c in enumerate(configs):
            for f in (c.field, f"negative_{c.field}"):
                if f not in fields:
                    raise ValueError(f"encoders[{i}].field: '{f}' is not a Req state field")
            writes.add(c.field)
            negatives.add(f"negative_{c.field}")
            modules[("encoders", i, "text_encoder")] = c.text_encoder
            modules[("encoders", i, "tokenizer")] = c.tokenizer
        return Contract(reads=frozenset(cls.reads), writes=frozenset(writes), optional_writes=frozenset(negatives),
                        optional_reads=frozenset(cls.optional_reads), modules=modules)

    def guaranteed_writes(self) -> tuple[str, ...]:
        return tuple(e["field"] for e in self.encoders)

    @torch.no_grad()
    def encode(self, enc: dict, prompts: list[str], req: Req) -> torch.Tensor:
        tokenizer, encoder = enc["tokenizer"], enc["text_encoder"]
        if enc.get("max_length_field"):
            max_length = getattr(req, enc["max_length_field"])
        else:
            max_length = enc.get("max_length") or tokenizer.model_max_length
        ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                        return_tensors="pt").input_ids
        out = encoder(ids.to(module_device(encoder)), output_hidden_states=False)
        emb = getattr(out, enc["output"])
        emb = emb.to(dtype=module_dtype(encoder))
        # one copy per image, keeping each prompt's copies together (as Diffusers does)
        return emb.repeat_interleave(req.num_images_per_prompt, dim=0)

    def forward(self, req: Req) -> Req:
        prompts = req.prompts()
        negatives = None
        if req.do_cfg:
            neg = req.negative_prompt if req.negative_prompt is not None else ""
            negatives = [neg] * len(prompts) if isinstance(neg, str) else list(neg)
        for enc in self.encoders:
            texts = prompts
            if enc.get("prompt_field") == "prompt_2" and req.prompt_2 is not None:
                texts = [req.prompt_2] * len(prompts) if isinstance(req.prompt_2, str) else list(req.prompt_2)
            setattr(req, enc["field"], self.encode(enc, texts, req))
            if negatives is not None:
                setattr(req, f"negative_{enc['field']}", self.encode(enc, negatives, req))
        return req
