"""The static check of a model YAML: schema, then stage contracts, every problem at once, before any
weight loads. Its result, CheckedModel, is what the build starts from."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .check import PlannedStage, check_contracts
from .errors import DiffstageError, SpecError, shown
from .model_yaml import load_model_yaml
from .models_dir import model_yaml
from .req import FieldSpec, Req
from .resolve import DEFAULT_ALLOWLIST
from .spec import ModelSpec, validate_spec
from .stage_catalog import standard_stages
from .yaml_lines import LineMap


@dataclass
class CheckedModel:
    """A model YAML that passed the schema and contract checks (nothing loaded yet)."""

    file: Path
    data: dict
    spec: ModelSpec
    plan: list[PlannedStage]
    allowlist: tuple[str, ...]
    lines: LineMap
    req_cls: type[Req] = Req  # the standard Req fields plus those the YAML and its stages declare

    def denoisers(self) -> list[str]:
        """The modules the denoising stages (those that take a step cache) run as their `transformer`: what
        runtime.quantize quantizes and runtime.offload=layers streams by default."""
        return list(dict.fromkeys(p.contract.modules[("transformer",)] for p in self.plan
                                  if hasattr(p.cls, "set_step_cache") and ("transformer",) in p.contract.modules))


def check_model(name_or_path: str | Path, allowlist: Iterable[str] = ()) -> CheckedModel:
    """Validate a model YAML (schema + stage contracts) without loading any weights.

    Raises SpecError listing every problem found, each with file, key path and line."""
    allowlist = [allowlist] if isinstance(allowlist, str) else list(allowlist)  # "os" is one prefix, not o, s
    if not all(isinstance(p, str) and p for p in allowlist):
        raise DiffstageError(f"allowlist must be a list of module prefixes (strings), got {shown(allowlist)}")
    file = model_yaml(str(name_or_path))
    data, lines = load_model_yaml(file)
    return check_data(data, file, lines, allowlist)


def check_data(data: Any, file: str | Path, lines: LineMap, allowlist: Iterable[str] = (),
               known_stages: Iterable[type] | None = None) -> CheckedModel:
    """The checks of check_model on model data already read (`lines` says where each key came from);
    `known_stages`: the classes short paths name (default: the standard stages)."""
    allow = tuple(DEFAULT_ALLOWLIST) + tuple(allowlist)
    spec, problems = validate_spec(data, str(file), lines)
    problems = lines.problems + problems
    plan: list[PlannedStage] = []
    declared: dict[str, str] = {}
    if isinstance(data, dict):
        known = list(known_stages) if known_stages is not None else standard_stages()
        plan, contract_problems, declared = check_contracts(data, str(file), lines, allow, known)
        problems += contract_problems
    if problems:
        problems.sort(key=lambda p: (p.file != str(file), p.file or "", p.line or 0, p.key))
        raise SpecError(problems)
    assert spec is not None
    fields = spec.field_specs() + [FieldSpec(name, "state", doc) for name, doc in declared.items()]
    return CheckedModel(Path(file), data, spec, plan, allow, lines, Req.with_fields(fields))
