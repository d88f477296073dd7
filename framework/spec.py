"""ModelSpec: the pydantic schema of a model YAML (pipelines_yaml/<name>.yaml).

Unknown keys are errors. Validation errors are turned into Problems that carry
the YAML file, the key path and the line."""
from __future__ import annotations

import re
import typing
from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .acceleration_spec import AccelerationSpec, Strict as _Strict
from .errors import Problem, did_you_mean, shown
from .req import FIELD_TYPES, FieldSpec, Req
from .yaml_lines import LineMap, format_key


class Task(str, Enum):
    t2i = "t2i"  # text to image
    ti2i = "ti2i"  # text + image to image (editing)
    i2i = "i2i"
    t2v = "t2v"  # text to video
    i2v = "i2v"
    ti2v = "ti2v"


class ModuleSpec(_Strict):
    """One module of the model. By default its class is the one model_index.json names."""

    target: str | None = Field(None, alias="_target_", description="class to load it with (dotted path)")
    subfolder: str | None = Field(None, description="folder inside the checkpoint; default: the module name")
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="dtype for this module only; default: runtime.dtype")

    @field_validator("subfolder")
    @classmethod
    def _inside_checkpoint(cls, value: str | None) -> str | None:
        if value is not None and (value.startswith(("/", "\\")) or ".." in value.replace("\\", "/").split("/")):
            raise ValueError("subfolder must be a relative path inside the checkpoint (no '..', not absolute)")
        return value


class PipelineConfigSpec(_Strict):
    settings: dict[str, Any] = Field(default_factory=dict, description="static model settings callbacks read")
    checkpoint_settings: dict[str, Any] = Field(
        default_factory=dict, description="settings whose value comes from the checkpoint's model_index.json "
                                          "(a pipeline's own config, e.g. force_zeros_for_empty_prompt): key -> the "
                                          "value when the checkpoint does not give one")
    callbacks: dict[str, dict[str, str]] = Field(
        default_factory=dict, description="callback dotted paths, grouped by the stage that calls them"
    )

    @model_validator(mode="after")
    def _checkpoint_keys(self):
        for key in self.checkpoint_settings:
            if not key.isidentifier() or key.startswith("_"):
                raise ValueError(f"checkpoint_settings: '{key}' is not a model_index.json config key (a name "
                                 "without a leading underscore)")
            if key in self.settings:
                raise ValueError(f"'{key}' is in both settings and checkpoint_settings: keep it in "
                                 "checkpoint_settings (its value there is the default for checkpoints without one)")
        return self


class SamplingSpec(_Strict):
    """Defaults for the sampling parameters; a request may override each."""

    num_inference_steps: int | None = Field(None, gt=0)
    height: int | None = Field(None, gt=0)
    width: int | None = Field(None, gt=0)
    guidance_scale: float | None = Field(None, ge=0, allow_inf_nan=False)
    true_cfg_scale: float | None = Field(None, ge=0, allow_inf_nan=False)
    max_sequence_length: int | None = Field(None, gt=0)
    negative_prompt: str | None = None
    num_images_per_prompt: int | None = Field(None, gt=0)


class RequestFieldSpec(_Strict):
    """An extra request field a model needs (`num_frames`, `image`, ...): accepted from the command line
    (`+sampling.NAME=...`) and from `pipe(..., NAME=...)`, checked like the standard ones."""

    type: Literal[FIELD_TYPES] = Field("any", description="int, float, str, text (a string or a list of strings), "
                                                          "bool, image or any")
    default: Any = Field(None, description="value when the request does not give one")
    ge: float | None = Field(None, allow_inf_nan=False, description="smallest allowed value (int/float)")
    le: float | None = Field(None, allow_inf_nan=False, description="largest allowed value (int/float)")
    choices: list[Any] | None = Field(None, description="the allowed values")
    doc: str = ""

    @model_validator(mode="after")
    def _default_is_allowed(self):
        if self.default is not None:
            problems = self.field_spec("default").problems(self.default)
            if problems:
                raise ValueError(problems[0])
        return self

    def field_spec(self, name: str) -> FieldSpec:
        return FieldSpec(name, "request", self.doc, self.type, self.default, self.ge, self.le,
                         tuple(self.choices) if self.choices is not None else None)


class StageSpec(BaseModel):
    """`_target_` plus the stage's arguments (checked against the stage class)."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)
    target: str = Field(alias="_target_")


class ModelSpec(_Strict):
    name: str
    description: str = ""
    pipeline_name: str = Field(description="the _class_name in model_index.json this YAML serves")
    task: Task
    hf_model_paths: list[str] = Field(default_factory=list)
    model_path: str | None = Field(None, description="default checkpoint: a directory (relative to this file) or repo id")
    examples: list[str] | dict[str, str] = Field(
        default_factory=list, description="example prompts (or label: prompt), used by `diffstage sheet`")
    modules: dict[str, ModuleSpec | None]
    attention: str | None = Field(
        None, description="attention backend for this model's native modules; `attention=NAME` on the command "
                          "line wins; default: sdpa")
    step_cache: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="settings per step cache kind (first_block, teacache) for this model, "
                                          "under the run's `cache.*`; the run's `cache=KIND` turns one on")
    acceleration: dict[str, AccelerationSpec] = Field(
        default_factory=dict, description="by module name (the transformer): its repeated blocks and where a step "
                                          "cache reads its residual stream, for stock Diffusers classes")
    pipeline_config: PipelineConfigSpec = Field(default_factory=PipelineConfigSpec)
    sampling: SamplingSpec = Field(default_factory=SamplingSpec)
    request_fields: dict[str, RequestFieldSpec] = Field(
        default_factory=dict, description="extra request fields this model takes, by name")
    stages: list[StageSpec] = Field(min_length=1)

    @field_validator("step_cache")
    @classmethod
    def _step_cache_settings(cls, value: dict) -> dict:
        from .step_cache import KINDS, settings_problems

        problems = []
        for kind, settings in value.items():
            if kind not in KINDS[1:]:
                problems.append(f"unknown step cache kind {shown(kind)}; known: {', '.join(KINDS[1:])}")
            elif "kind" in settings:
                problems.append(f"step_cache.{kind}: 'kind' is the section's name; drop the key")
            else:
                problems += settings_problems(settings, f"step_cache.{kind}")
        if problems:
            raise ValueError("; ".join(problems))
        return value

    @field_validator("acceleration")
    @classmethod
    def _declared_modules(cls, value: dict, info) -> dict:
        known = list(info.data.get("modules") or {})
        for name in value:
            if name not in known:
                hint = did_you_mean(name, known)
                raise ValueError(f"acceleration names {shown(name)}, which is not one of the model's modules"
                                 + (f" ({hint})" if hint else f" ({', '.join(known)})"))
        return value

    @field_validator("request_fields")
    @classmethod
    def _new_field_names(cls, value: dict) -> dict:
        for name in value:
            if not name.isidentifier() or name.startswith("_"):
                raise ValueError(f"request field name {shown(name)} must be a Python identifier not starting with _")
            if name in Req.field_names():
                raise ValueError(f"'{name}' is already a standard Req field; declare only new names")
        return value

    def field_specs(self) -> list[FieldSpec]:
        """The declared request fields, as Req.with_fields takes them."""
        return [spec.field_spec(name) for name, spec in self.request_fields.items()]

    def module_spec(self, name: str) -> ModuleSpec:
        return self.modules.get(name) or ModuleSpec()


def _keys_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """Valid keys of the mapping at `loc` (for "did you mean" on unknown keys)."""
    ann: Any = model
    for part in loc:
        origin = typing.get_origin(ann)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            fields = {(f.alias or n): f for n, f in ann.model_fields.items()}
            if part not in fields:
                return []
            ann = fields[part].annotation
        elif origin in (list, dict):
            ann = typing.get_args(ann)[-1]
        else:
            return []
        # unwrap Optional[X]
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        if typing.get_origin(ann) in (typing.Union, getattr(__import__("types"), "UnionType", None)) and len(args) == 1:
            ann = args[0]
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return [(f.alias or n) for n, f in ann.model_fields.items()]
    return []


def validate_spec(data: Any, file: str, lines: LineMap) -> tuple[ModelSpec | None, list[Problem]]:
    if not isinstance(data, dict):
        return None, [Problem("a model YAML must be a mapping with keys name, pipeline_name, task, modules, "
                              "stages, ...", file=file, line=1)]
    try:
        return ModelSpec.model_validate(data), []
    except ValidationError as e:
        problems = []
        for err in e.errors():
            # drop pydantic's tags for union members and validators ("dict[str,str]", "[key]", "function-...")
            loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and (
                p.startswith("function-") or p == "[key]" or re.fullmatch(r"\w+\[.*\]", p))))
            hint = None
            if err["type"] == "extra_forbidden":
                msg = f"unknown key '{loc[-1]}'"
                valid = _keys_at(ModelSpec, loc[:-1])
                hint = did_you_mean(loc[-1], valid) or ("valid keys: " + ", ".join(valid) if valid else None)
            elif err["type"] == "missing":
                msg = f"missing required key '{loc[-1]}'"
            else:
                msg = f"{err['msg']} (got {shown(err.get('input'))})"
            where_file, line = lines.where(loc)
            problems.append(Problem(msg, key=format_key(loc), file=where_file or file, line=line, hint=hint))
        return None, problems
