"""Req: the one object that flows through the stages.

The standard fields are named once, here. Request fields come from the caller
(or the model's sampling defaults); state fields are written by stages. The
static check uses this split: a stage may read a request field freely, but a
state field only after an earlier stage writes it.

The schema is open: a model YAML may declare extra request fields
(`request_fields:`) and a stage may declare the state fields it introduces
(`Contract.declares`). `Req.with_fields` makes the Req class of one pipeline,
with those fields added and typed; setting a name outside it is an error."""
from __future__ import annotations

import copy
import functools
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, fields, make_dataclass
from typing import Any

from .errors import did_you_mean, shown

# The names read from any Req while a run records them (see recording_reads); per thread, so that runs of
# other pipelines in other threads do not mix in.
_READS: ContextVar[set[str] | None] = ContextVar("diffstage_req_reads", default=None)


@contextmanager
def recording_reads() -> Iterator[set[str]]:
    """Collect the attribute names read from Req objects in this thread: what a run actually used."""
    names: set[str] = set()
    token = _READS.set(names)
    try:
        yield names
    finally:
        _READS.reset(token)


@contextmanager
def unrecorded() -> Iterator[None]:
    """Reads that use nothing: validation looks at every setting."""
    token = _READS.set(None)
    try:
        yield
    finally:
        _READS.reset(token)


FIELD_TYPES = ("int", "float", "str", "text", "bool", "image", "any")  # text: a string or a list of strings


@dataclass(frozen=True)
class FieldSpec:
    """A Req field beyond the standard ones: a request field a model YAML declares (with its type,
    default and range, checked on every request) or a state field a stage declares."""

    name: str
    role: str  # "request" or "state"
    doc: str = ""
    type: str = "any"  # one of FIELD_TYPES
    default: Any = None
    ge: float | None = None
    le: float | None = None
    choices: tuple | None = None

    def problems(self, value: Any) -> list[str]:
        """What is wrong with `value` for this field (None, "not given", is always fine)."""
        if value is None:
            return []
        from .images import is_image

        kind = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
                "text": "a string or a list of strings",
                "image": "an image (a PIL image, a [C, H, W] tensor or a file path)", "any": "a value"}[self.type]
        ok = {"int": isinstance(value, int) and not isinstance(value, bool),
              "float": isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
              "str": isinstance(value, str), "bool": isinstance(value, bool),
              "text": isinstance(value, str) or (isinstance(value, (list, tuple)) and bool(value)
                                                 and all(isinstance(v, str) for v in value)),
              "image": is_image(value), "any": True}[self.type]
        bounds = [f">= {self.ge:g}"] if self.ge is not None else []
        bounds += [f"<= {self.le:g}"] if self.le is not None else []
        wanted = kind + (f" {' and '.join(bounds)}" if bounds else "") + \
            (f" (one of {', '.join(map(str, self.choices))})" if self.choices else "")
        if ok and self.type in ("int", "float"):
            ok = (self.ge is None or value >= self.ge) and (self.le is None or value <= self.le)
        if ok and self.choices is not None:
            ok = value in self.choices
        if not ok:
            return [f"{self.name} must be {wanted}, got {shown(value)}"]
        if self.type == "image" and isinstance(value, (str, os.PathLike)) and not os.path.isfile(value):
            return [f"{self.name}: no image file at {shown(value)}"]
        return []


def _request(default: Any = None, doc: str = "") -> Any:
    return field(default=default, metadata={"role": "request", "doc": doc})


def _state(doc: str = "") -> Any:
    return field(default=None, metadata={"role": "state", "doc": doc})


@dataclass
class Req:
    # --- request: what the caller asks for -------------------------------
    prompt: str | list[str] | None = _request(None, "text prompt(s)")
    prompt_2: str | list[str] | None = _request(None, "prompt for the second text encoder; defaults to prompt")
    negative_prompt: str | list[str] | None = _request(None, "negative prompt(s) for classifier-free guidance")
    seed: int | None = _request(None, "seed of the CPU generator the initial noise is drawn from")
    num_inference_steps: int | None = _request(None, "number of denoising steps")
    height: int | None = _request(None, "output height in pixels")
    width: int | None = _request(None, "output width in pixels")
    guidance_scale: float | None = _request(None, "guidance scale (embedded guidance for distilled models)")
    true_cfg_scale: float | None = _request(None, "classifier-free guidance scale applied with a negative prompt")
    max_sequence_length: int | None = _request(None, "token length of the sequence text encoder")
    num_images_per_prompt: int = _request(1, "images generated per prompt")
    output_type: str = _request("pil", "'pil', 'np', 'pt' or 'latent'")
    input_latents: Any = _request(None, "optional initial latents instead of random noise")
    loras: list | None = _request(None, "LoRA adapters for this run, [{path, scale}] (default: the run config's lora)")

    # --- state: written by stages ------------------------------------------
    batch_size: int | None = _state("number of prompts times images per prompt")
    generator: Any = _state("torch.Generator seeded from `seed`")
    do_cfg: bool | None = _state("whether classifier-free guidance runs")
    cfg_scale: float | None = _state("the CFG scale in use")
    prompt_embeds: Any = _state("sequence text embeddings [B, L, D]")
    pooled_prompt_embeds: Any = _state("pooled text embeddings [B, D]")
    negative_prompt_embeds: Any = _state("sequence embeddings of the negative prompt")
    negative_pooled_prompt_embeds: Any = _state("pooled embeddings of the negative prompt")
    text_position_ids: Any = _state("position ids of text tokens (e.g. for RoPE)")
    latents: Any = _state("latents being denoised (packed if the model packs them)")
    raw_latent_shape: tuple | None = _state("latent shape before packing, [B, C, H, W]")
    image_position_ids: Any = _state("position ids of latent tokens (e.g. for RoPE)")
    timesteps: Any = _state("timestep schedule, one per step")
    sigmas: Any = _state("noise levels of the schedule")
    latents_noised: bool | None = _state("the latents already carry the first timestep's noise (an input image's "
                                         "latents, noised): DenoisingStage does not scale them by init_noise_sigma")
    decoded: Any = _state("decoded images as a tensor in [0, 1], [B, C, H, W]")
    output: Any = _state("final output in `output_type` form")

    # Free-form extras a custom stage may attach (not checked statically).
    extra: dict = field(default_factory=dict, metadata={"role": "internal", "doc": "custom stage scratch space"})

    @classmethod
    def field_names(cls, role: str | None = None) -> set[str]:
        return {f.name for f in fields(cls) if role is None or f.metadata.get("role") == role}

    @classmethod
    def extra_fields(cls) -> list[FieldSpec]:
        """The fields `with_fields` added to the standard ones."""
        return [f.metadata["spec"] for f in fields(cls) if "spec" in f.metadata]

    @classmethod
    def with_fields(cls, specs: list[FieldSpec]) -> type[Req]:
        """The Req class of a pipeline: the standard fields plus `specs` (declared by its YAML and stages)."""
        standard = Req.field_names()
        clashes = sorted(s.name for s in specs if s.name in standard)
        if clashes:
            raise ValueError(f"{', '.join(clashes)} "
                             f"{'is already a standard Req field' if len(clashes) == 1 else 'are already standard Req fields'}"
                             "; declare only new names")
        if not specs:
            return Req
        extra = [(s.name, Any, _declared_field(s)) for s in specs]
        return make_dataclass("Req", extra, bases=(Req,), namespace={"__module__": Req.__module__})

    def __getattribute__(self, name: str) -> Any:
        reads = _READS.get()
        if reads is not None:
            reads.add(name)
        return object.__getattribute__(self, name)

    def __setattr__(self, name: str, value: Any) -> None:
        # a misspelt field would otherwise be set quietly and never read
        names = type(self).__dict__.get("_names")
        if names is None:
            names = frozenset(f.name for f in fields(type(self)))
            type.__setattr__(type(self), "_names", names)
        if name not in names:
            hint = did_you_mean(name, sorted(names))
            raise AttributeError(f"Req has no field '{name}'" + (f" ({hint})" if hint else "")
                                 + "; a stage declares new fields in its contract (`declares`), a model YAML in "
                                   "`request_fields`")
        object.__setattr__(self, name, value)

    def declared_field_problems(self) -> list[str]:
        """Type and range problems of the request fields a model YAML declared."""
        return [msg for spec in self.extra_fields() if spec.role == "request"
                for msg in spec.problems(getattr(self, spec.name))]

    @classmethod
    def request_fields(cls) -> set[str]:
        return cls.field_names("request")

    @classmethod
    def state_fields(cls) -> set[str]:
        return cls.field_names("state")

    def prompts(self) -> list:
        """The prompts as a list (items are not checked here: InputValidationStage does that)."""
        p = self.prompt
        if p is None:
            return []
        return list(p) if isinstance(p, (list, tuple)) else [p]

    def requested_batch_size(self) -> int:
        """Prompts times images per prompt: the batch the stages will run."""
        n = self.num_images_per_prompt
        return len(self.prompts()) * (n if isinstance(n, int) and not isinstance(n, bool) else 1)


def _declared_field(spec: FieldSpec):
    """The dataclass field of a declared field: a list or dict default is copied for each request (a YAML's
    `default: [0, 0]`), so one request changing it changes no other."""
    meta = {"role": spec.role, "doc": spec.doc, "spec": spec}
    if isinstance(spec.default, (list, dict, set)):
        return field(default_factory=functools.partial(copy.deepcopy, spec.default), metadata=meta)
    return field(default=spec.default, metadata=meta)
