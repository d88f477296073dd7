"""The JSON Schema (draft 2020-12) of the model YAML format (`diffstage schema`), for editors: with

    # yaml-language-server: $schema=./diffstage.schema.json

as a model YAML's first line, an editor completes keys and marks unknown ones, and arguments of the
standard stages that they do not take, before `diffstage validate` runs. It comes from ModelSpec and
from the standard stages' __init__ signatures; `diffstage validate` stays the full check."""
from __future__ import annotations

import json
from typing import Any

from pydantic import TypeAdapter

from .check import stage_signature
from .spec import ModelSpec
from .stage import PipelineStage
from .stage_catalog import standard_stages

DIALECT = "https://json-schema.org/draft/2020-12/schema"
STANDARD_PREFIX = "diffstage.stages."
# `diffstage.stages.Name` that is not a standard stage: a misspelt one (user stages live elsewhere)
_STANDARD_LOOKALIKE = r"^diffstage\.stages\.[A-Za-z_][A-Za-z0-9_]*$"
# set by the builder for a stage that takes every module, never by the YAML (see PipelineStage)
_BUILDER_ARGS = ("modules", "pipeline_class")


def _targets(cls: type) -> list[str]:
    """The dotted paths that name a standard stage: the short one and its module's."""
    return list(dict.fromkeys([STANDARD_PREFIX + cls.__name__, f"{cls.__module__}.{cls.__name__}"]))


def _hoist(schema: dict, defs: dict) -> dict:
    """Move a sub-schema's $defs to the top level, where its "#/$defs/..." references point."""
    for name, sub in schema.pop("$defs", {}).items():
        if defs.setdefault(name, sub) != sub:
            raise RuntimeError(f"two different schemas are named '{name}'")  # a stage type clashing with ours
    return schema


def _json_value(value: Any) -> tuple[bool, Any]:
    """(whether `value` can be written in JSON, the value as JSON has it: a tuple becomes a list)."""
    try:
        return True, json.loads(json.dumps(value))
    except (TypeError, ValueError):
        return False, None


def _argument_schema(cls: type[PipelineStage], name: str, param, hints: dict, defs: dict) -> dict:
    if name in cls.module_params:
        return {"type": "string", "description": f"the module to use (default: the module named '{name}')"}
    schema: dict = {}
    if name in hints:
        try:
            schema = _hoist(TypeAdapter(hints[name]).json_schema(), defs)
        except Exception:  # a type pydantic cannot describe (a custom class): any value, as the check does
            schema = {}
    if param.default is not param.empty:
        ok, default = _json_value(param.default)
        if ok:
            schema["default"] = default
    return schema


_NAME = {"type": "string", "pattern": r"^[A-Za-z_][A-Za-z0-9_]*$",
         "description": "the stage's name in the pipeline (default: its class name in snake case)"}


def stage_arguments_schema(cls: type[PipelineStage], defs: dict) -> dict:
    """The schema of one standard stage's YAML entry: `_target_` plus the arguments its __init__ takes."""
    params, hints, var_kw = stage_signature(cls)
    properties: dict[str, Any] = {"_target_": {"enum": _targets(cls)}, "_name_": _NAME}
    required = ["_target_"]
    for name, param in params.items():
        if cls.takes_all_modules and name in _BUILDER_ARGS:
            continue
        properties[name] = _argument_schema(cls, name, param, hints, defs)
        if param.default is param.empty and name not in cls.module_params:
            required.append(name)
    schema = {"title": cls.__name__, "type": "object", "properties": properties, "required": required}
    doc = (cls.__doc__ or "").strip()
    if doc:
        schema["description"] = doc.splitlines()[0]
    if not var_kw:  # a misspelt argument is an error, as in the check
        schema["additionalProperties"] = False
    return schema


def _stage_schema(stages: list[type[PipelineStage]], defs: dict) -> dict:
    """One entry of `stages`: a standard stage's arguments are checked (if its `_target_` matches,
    then its schema applies); any other class, a user's stage, takes whatever arguments it defines."""
    rules, known = [], []
    for cls in stages:
        defs[cls.__name__] = stage_arguments_schema(cls, defs)
        known += _targets(cls)
        rules.append({"if": {"properties": {"_target_": {"enum": _targets(cls)}}, "required": ["_target_"]},
                      "then": {"$ref": f"#/$defs/{cls.__name__}"}})
    target = {"type": "string", "minLength": 1,
              "description": "dotted path of the stage class: a standard one (diffstage.stages.NAME) or your own",
              "anyOf": [{"enum": known}, {"not": {"pattern": _STANDARD_LOOKALIKE}}]}
    return {"title": "Stage", "description": "a stage: `_target_` plus the arguments of its class",
            "type": "object", "properties": {"_target_": target, "_name_": _NAME}, "required": ["_target_"],
            "allOf": rules}


def model_schema() -> dict:
    """The JSON Schema of a model YAML as written (before `extends:` is followed)."""
    schema = ModelSpec.model_json_schema(by_alias=True)
    defs = schema.setdefault("$defs", {})
    defs["StageSpec"] = _stage_schema(standard_stages(), defs)  # what `stages: [...]` refers to
    schema["properties"] = {"extends": {
        "type": "string", "minLength": 1,
        "description": "a shipped model name, or a YAML path relative to this file, whose keys this file "
                       "extends: mappings merge key by key (this file wins), lists and scalars are replaced"},
        **schema["properties"]}
    # a variant is partial: what it leaves out comes from the file it extends
    required = schema.pop("required", [])
    body = {k: v for k, v in schema.items() if k not in ("title", "$defs")}
    return {"$schema": DIALECT, "title": "diffstage model YAML",
            "description": "one model's modules, stages and callbacks (pipelines_yaml/<name>.yaml)", **body,
            "if": {"required": ["extends"]}, "else": {"required": required}, "$defs": defs}


def model_schema_json() -> str:
    return json.dumps(model_schema(), indent=2, ensure_ascii=False) + "\n"
