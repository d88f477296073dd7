"""The `acceleration:` declaration of a model YAML: what the engine needs to know about a stock module (a
transformer) to give it step caches, sequence parallelism and diffstage's attention, without rewriting it.

Checked here for shape; checked against the loaded class by block_cache.py and distributed/split_plan.py."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .errors import shown


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ResidualSpec(Strict):
    """Where a block's call and return carry the residual stream (the hidden states), for step caches."""

    input: str = Field("hidden_states", description="the block forward's argument that carries the hidden states")
    returns: str | list[str] = Field(
        "hidden_states", description="what a block returns, each item named by the forward argument it is the new "
                                     "value of: one name for a single tensor (hidden_states), a list for a tuple "
                                     "(e.g. [encoder_hidden_states, hidden_states]); must name `input`")

    @model_validator(mode="after")
    def _returns_the_input(self):
        names = [self.returns] if isinstance(self.returns, str) else self.returns
        bad = [n for n in [self.input, *names] if not n.isidentifier()]
        if bad:
            raise ValueError(f"{shown(bad[0])} is not an argument name")
        if self.input not in names or len(set(names)) != len(names):
            raise ValueError(f"returns must name the input {shown(self.input)} once, got {shown(self.returns)}")
        return self


class ProbeSpec(Strict):
    """What cache=teacache measures each call: a module's output (the first item of a tuple) or an argument of its
    call, e.g. the first block's timestep-modulated input. Written as the module path alone for its output."""

    module: str = Field(description="module path relative to the declared module, e.g. 'blocks.0.norm1'")
    input: str | None = Field(None, description="the argument of that module's call to measure (by its name in "
                                                "the module's forward); default: the module's output")

    @field_validator("module")
    @classmethod
    def _module_path(cls, value: str) -> str:
        if not value or any(not (p.isidentifier() or p.isdigit()) for p in value.split(".")):
            raise ValueError(f"{shown(value)} is not a module path (names and indices joined by '.')")
        return value

    @field_validator("input")
    @classmethod
    def _argument_name(cls, value: str | None) -> str | None:
        if value is not None and not value.isidentifier():
            raise ValueError(f"{shown(value)} is not an argument name")
        return value


class SplitSpec(Strict):
    """One tensor split over the sequence ranks: along `dim`, only when it has `ndim` dimensions (if given)."""

    dim: int = Field(description="the dimension to split (the token dimension)")
    ndim: int | None = Field(None, ge=1, description="split only a tensor of this many dimensions (others pass "
                                                     "whole, e.g. a per-sample timestep beside a per-token one)")


Split = int | SplitSpec


def _paths_ok(value: dict) -> dict:
    for path in value:
        parts = path.split(".") if path else []
        if any(not (p.isidentifier() or p.isdigit() or p == "*") for p in parts):
            raise ValueError(f"{shown(path)} is not a module path (names and indices joined by '.', '*' for every "
                             "item of a list, '' for the module itself)")
    return value


class SequenceSpec(Strict):
    """Where the module's token sequences split over the ranks of parallel.ulysses / parallel.ring, and where the
    result is gathered. Module paths are relative to the declared module ('' is the module itself; 'blocks.*' is
    every item of the list `blocks`). Mirrors the `_cp_plan` Diffusers puts on some classes, its default."""

    inputs: dict[str, dict[str, Split]] = Field(
        default_factory=dict, description="module path -> {forward argument: dim}: split as that module is called")
    outputs: dict[str, dict[int, Split]] = Field(
        default_factory=dict, description="module path -> {output index (0 for a single tensor): dim}: split as "
                                          "that module returns (e.g. rotary embeddings computed for every token)")
    gather: dict[str, int] = Field(
        min_length=1, description="module path -> dim: that module's output gathered from every rank (the last "
                                  "projection); required: without it each rank would return only its share")

    @field_validator("inputs", "outputs", "gather")
    @classmethod
    def _module_paths(cls, value: dict) -> dict:
        return _paths_ok(value)

    @model_validator(mode="after")
    def _splits_something(self):
        if not self.inputs and not self.outputs:
            raise ValueError("declare what splits: `inputs` (module path -> {argument: dim}) or `outputs`")
        return self


class AttentionSpec(Strict):
    """Which attention modules diffstage's attention layer runs, and which of them attend to keys every rank
    holds whole (cross-attention to the text: no exchange between ranks)."""

    local: list[str] | None = Field(
        None, description="module path patterns (fnmatch, e.g. 'blocks.*.attn2') of attention modules whose keys "
                          "are not split; default: those Diffusers marks is_cross_attention")


class AccelerationSpec(Strict):
    """What the engine needs to know about one stock module (a transformer) to accelerate it: checked against
    the loaded module before the first run."""

    blocks: list[str] | None = Field(
        None, min_length=1, description="the module's ModuleList attributes holding its repeated blocks, in the "
                                        "order its forward runs them (dotted for nested ones); default: those "
                                        "holding the block classes the Diffusers class names in _repeated_blocks")
    residual: ResidualSpec | None = Field(
        None, description="where the blocks' call and return carry the hidden states; declaring it lets "
                          "cache=first_block skip the blocks after the first ones")
    probe: ProbeSpec | str | None = Field(  # a string is the module path alone (made a ProbeSpec on validation)
        None, description="what cache=teacache measures: the module path (relative to this module) whose output is "
                          "the first block's timestep-modulated input, or {module, input} for an argument of its "
                          "call; without it, cache=teacache is refused")
    sequence: SequenceSpec | None = Field(
        None, description="where the token sequences split for parallel.ulysses / parallel.ring; default: the "
                          "class's Diffusers _cp_plan, if it has one")
    attention: AttentionSpec = Field(
        default_factory=AttentionSpec, description="how its attention modules run under diffstage's attention "
                                                   "layer (backends, sequence parallelism)")

    @field_validator("probe", mode="before")
    @classmethod
    def _probe_shorthand(cls, value):
        return {"module": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _probe_needs_residual(self):
        if self.probe is not None and self.residual is None:
            raise ValueError("`probe` needs `residual` (a skipped call adds the blocks' cached residual)")
        return self

