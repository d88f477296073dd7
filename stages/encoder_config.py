"""One text encoder of TextEncodingStage, as the YAML configures it, and the token limits it has."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class EncoderConfig(BaseModel):
    """One text encoder, as configured in the YAML."""

    model_config = ConfigDict(extra="forbid")
    text_encoder: str  # module name
    tokenizer: str  # module name
    field: str  # Req field the embeddings go to; negatives go to "negative_<field>"
    output: str = "last_hidden_state"  # attribute of the encoder output: pooler_output, last_hidden_state, ...
    hidden_layer: int | None = None  # take hidden_states[hidden_layer] instead (-2: the penultimate layer)
    # other outputs of the same call, each to a field of its own ({text_embeds: pooled}): one encoder call gives
    # both a CLIP's penultimate states and its pooled projection
    extra_outputs: dict[str, str] = {}
    max_length: Annotated[int, Field(ge=1)] | None = None  # fixed token length; default: tokenizer.model_max_length
    max_length_field: Literal["max_sequence_length"] | None = None  # take the length from the request instead
    prompt_field: str = "prompt"  # request field with this encoder's prompt; prompt when that is unset or empty
    negative_prompt_field: str = "negative_prompt"  # likewise for the negative prompt
    template: str | None = None  # the text around each prompt, which goes where "{}" is (a chat template)
    # the negative prompt's template (an instruction some models put before the prompt only): default the
    # same as `template`; "{}" for none
    negative_template: str | None = None
    # the number of tokens the template puts before the prompt (as the tokenizer encodes that text, special
    # tokens included) goes to this state field, for callbacks that drop or count them
    template_tokens_field: str | None = None
    padding_side: Literal["left", "right"] | None = None  # where the padding goes; default the tokenizer's own
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
        for key in ("template", "negative_template"):
            if getattr(self, key) is not None and getattr(self, key).count("{}") != 1:
                raise ValueError(f"{key} must contain '{{}}' exactly once (where the prompt goes)")
        if self.template_tokens_field is not None and self.template is None:
            raise ValueError("template_tokens_field counts the tokens of `template`: set a template")
        if "hidden_states" in self.extra_outputs:
            raise ValueError("extra_outputs: hidden_states is one tensor per layer; take a layer with hidden_layer")
        fields = [self.field, *([self.mask_field] if self.mask_field else []), *self.extra_outputs.values()]
        if len(set(fields)) != len(fields):
            raise ValueError(f"field, mask_field and extra_outputs must name different fields, got {fields}")
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
