"""The static contract check: runs on the raw YAML data before any weight loads.

Walks the stages in order with the set of Req fields available so far and
reports, all at once: unresolvable or disallowed targets, stage arguments the
stage does not take (or of the wrong type), unknown module names, fields a stage
reads that nothing produces, missing callbacks, and callbacks nothing calls."""
from __future__ import annotations

import inspect
import json
import typing
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from pydantic import TypeAdapter, ValidationError

from .callbacks import declared_reads
from .errors import DiffstageError, DisallowedPathError, Problem, did_you_mean, shown
from .loader import module_kind
from .req import Req
from .resolve import ALLOWLIST_HINT, CALLBACK_HINT, callback_allowlist, disallowed, is_allowed, resolve
from .stage import Contract, PipelineStage, accepts_positional
from .yaml_lines import LineMap, format_key


@dataclass
class PlannedStage:
    """A stage that passed the check: its class, YAML args and contract."""

    index: int
    cls: type[PipelineStage]
    args: dict[str, Any]
    contract: Contract


def stage_signature(cls: type) -> tuple[dict[str, inspect.Parameter], dict[str, Any], bool]:
    """(parameters, type hints, accepts **kwargs) of a stage's __init__."""
    sig = inspect.signature(cls.__init__)
    params = {n: p for n, p in list(sig.parameters.items())[1:]
              if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    var_kw = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
    try:
        hints = typing.get_type_hints(cls.__init__, include_extras=True)  # keep Field(ge=...)
    except Exception:  # unresolvable forward refs: skip type checks, keep name checks
        hints = {}
    return params, hints, var_kw


def _not_json(value: Any) -> Any:
    raise TypeError(f"a YAML {type(value).__name__} value ({shown(value)}) cannot be a stage argument; "
                    "use a string, number, boolean, list or mapping")


def _value_at(value: Any, loc: tuple) -> Any:
    """The part of a YAML value that a pydantic error location points at (the whole value if unsure)."""
    for part in loc:
        try:
            value = value[part]
        except (KeyError, IndexError, TypeError):
            return value
    return value


class _Checker:
    def __init__(self, data: dict, file: str, lines: LineMap, allowlist: Iterable[str],
                 known_stages: Iterable[type[PipelineStage]]):
        self.data, self.file, self.lines = data, file, lines
        self.allowlist = tuple(allowlist)
        self.known_stages = list(known_stages)
        self.problems: list[Problem] = []
        self.declared_state: dict[str, str] = {}  # new state fields the stages declare: name -> doc

    def add(self, path: tuple, message: str, hint: str | None = None, stage: str | None = None) -> None:
        file, line = self.lines.where(path)
        self.problems.append(Problem(message, key=format_key(path), file=file or self.file,
                                     line=line, hint=hint, stage=stage))

    # -- helpers -------------------------------------------------------------
    def _mapping(self, *path) -> dict:
        node: Any = self.data
        for p in path:
            node = node.get(p) if isinstance(node, dict) else None
        return node if isinstance(node, dict) else {}

    def _resolve(self, path: tuple, target: str, what: str, hint_from: Iterable[str] = ()) -> Any:
        """The object `target` names, or None after recording why not (allowlist first)."""
        if not is_allowed(target, self.allowlist):
            self.add(path, *disallowed(target, self.allowlist))
            return None
        try:
            return resolve(target, self.allowlist)
        except DisallowedPathError as e:
            self.add(path, str(e).split(" (")[0], hint=ALLOWLIST_HINT)
        except DiffstageError as e:
            self.add(path, f"{what}: {e}", hint=did_you_mean(target, hint_from))
        return None

    def _resolve_stage(self, i: int, target: Any) -> type[PipelineStage] | None:
        path = ("stages", i, "_target_")
        if not isinstance(target, str):
            self.add(("stages", i), "stage has no `_target_` (the dotted path of its class)")
            return None
        names = [f"{c.__module__}.{c.__name__}" for c in self.known_stages]
        short = [f"diffstage.stages.{c.__name__}" for c in self.known_stages]
        cls = self._resolve(path, target, "unknown stage", short + names)
        if cls is None:
            return None
        if not (isinstance(cls, type) and issubclass(cls, PipelineStage)):
            self.add(path, f"'{target}' is not a PipelineStage subclass")
            return None
        return cls

    def _check_args(self, i: int, cls: type[PipelineStage], args: dict) -> tuple[bool, set[str]]:
        """(all arguments valid, names of those whose values are invalid)."""
        params, hints, var_kw = stage_signature(cls)
        ok, bad = True, set()
        for name, value in args.items():
            path = ("stages", i, name)
            if name not in params:
                if not var_kw:
                    self.add(path, f"unknown argument '{name}'", stage=cls.__name__,
                             hint=did_you_mean(name, params) or f"{cls.__name__} takes: {', '.join(params) or 'nothing'}")
                    ok = False
                continue
            if cls.takes_all_modules and name in ("modules", "pipeline_class"):
                self.add(path, f"argument '{name}' is set by the builder (every loaded module, the checkpoint's "
                               "pipeline class), not by the YAML", stage=cls.__name__)
                ok = False
                continue
            if name in cls.module_params:
                if not isinstance(value, str):
                    self.add(path, f"argument '{name}' must name a module (a string), got {shown(value)}",
                             stage=cls.__name__)
                    bad.add(name)
                continue
            if name in hints and not self._check_arg_value(path, hints[name], value, cls.__name__):
                bad.add(name)
        for name, p in params.items():
            if p.default is inspect.Parameter.empty and name not in args and name not in cls.module_params:
                self.add(("stages", i), f"missing required argument '{name}'", stage=cls.__name__)
                ok = False
        return ok and not bad, bad

    def _check_arg_value(self, path: tuple, hint: Any, value: Any, stage: str) -> bool:
        """Strict, as JSON is: "16" is not an int and "no" is not a bool, so the stage gets exactly
        the value the YAML wrote (a list where it takes a tuple is fine, as is 1 for a float)."""
        try:
            adapter = TypeAdapter(hint)
        except Exception:  # a type pydantic cannot check (a custom class): names were checked
            return True
        try:
            text = json.dumps(value, default=_not_json)
        except (TypeError, ValueError) as e:
            self.add(path, str(e), stage=stage)
            return False
        try:
            adapter.validate_json(text, strict=True)
        except ValidationError as e:
            for err in e.errors():
                sub = path + tuple(err["loc"])
                self.add(sub, f"{err['msg']} (got {shown(_value_at(value, err['loc']))})", stage=stage)
            return False
        return True

    def _check_attention(self) -> None:
        backend = self.data.get("attention")
        if isinstance(backend, str):
            from .attention.backends import known_backends

            # a known name is enough here: whether it is installed matters only if the run uses it
            known = known_backends()
            if backend not in known:
                self.add(("attention",), f"unknown attention backend {shown(backend)}; known: {', '.join(known)}",
                         hint=did_you_mean(backend, known))

    # -- the walk ----------------------------------------------------------------
    def run(self) -> list[PlannedStage]:
        stages = self.data.get("stages")
        if not isinstance(stages, list):
            return []
        modules = set(self._mapping("modules"))
        self._check_attention()
        given_callbacks = self._mapping("pipeline_config", "callbacks")

        yaml_request = {n for n in self._mapping("request_fields") if isinstance(n, str) and n.isidentifier()}
        request = Req.request_fields() | yaml_request
        available = set(request)
        maybe: set[str] = set()  # optional writes of earlier stages
        plan: list[PlannedStage] = []
        used_modules: set[str] = set()
        taken: dict[str, dict[str, Any]] = {}  # callback group -> {name: spec}
        writers_in_pipeline: dict[str, list[int]] = {}

        # First pass: every stage's contract. A stage with bad arguments still
        # contributes its declared contract when it can, so one typo does not
        # cascade into "nothing writes X" errors further down.
        contracts: list[tuple[int, type[PipelineStage], dict, Contract, bool]] = []
        first_unknown = len(stages)  # index of the first stage whose contract is unknown
        for i, raw in enumerate(stages):
            if not isinstance(raw, dict):
                first_unknown = min(first_unknown, i)
                continue  # the schema check reports it
            cls = self._resolve_stage(i, raw.get("_target_"))
            if cls is None:
                first_unknown = min(first_unknown, i)
                continue
            name = raw.get("_name_")
            if name is not None and not (isinstance(name, str) and name.isidentifier()):
                self.add(("stages", i, "_name_"), f"a stage name must be a Python identifier, got {shown(name)}")
            args = {k: v for k, v in raw.items() if k not in ("_target_", "_name_")}
            valid, bad = self._check_args(i, cls, args)
            try:  # the contract from the valid arguments only: invalid values would make noise
                contract = cls.contract({k: v for k, v in args.items() if k not in bad})
            except Exception as e:  # a stage rejecting its own args
                if not bad:
                    self.add(("stages", i), f"invalid arguments: {type(e).__name__}: {e}", stage=cls.__name__)
                first_unknown = min(first_unknown, i)
                continue
            if bad:  # what the stage reads or writes may depend on the invalid ones
                first_unknown = min(first_unknown, i)
            contracts.append((i, cls, args, contract, valid))
            for f in contract.writes:
                writers_in_pipeline.setdefault(f, []).append(i)
        self.reads_of = {i: c.reads for i, _, _, c, _ in contracts}
        certain = first_unknown == len(stages)  # every stage's needs are known
        self.declared_state = self._declared_state(contracts, request)
        all_fields = Req.field_names() | yaml_request | set(self.declared_state)

        for i, cls, args, contract, valid in contracts:
            for arg_path, module in contract.modules.items():
                used_modules.add(module)
                if module not in modules:
                    declared = f"declared modules: {', '.join(sorted(modules))}" if modules else "no modules are declared"
                    self.add(("stages", i) + tuple(arg_path), f"unknown module '{module}'", stage=cls.__name__,
                             hint=did_you_mean(module, modules) or declared)
            callback_reads = self._callback_reads(cls, contract, given_callbacks)
            own = contract.reads | contract.optional_reads  # reported once, for the stage
            reads = [(f, ("stages", i), "reads") for f in sorted(contract.reads)] + \
                [(f, path, f"callback '{name}' reads") for f, path, name, optional in callback_reads
                 if not optional and f not in contract.reads]
            optional_reads = [(f, ("stages", i), "reads") for f in sorted(contract.optional_reads)] + \
                [(f, path, f"callback '{name}' reads") for f, path, name, optional in callback_reads
                 if optional and f not in own]
            for f, path, what in reads + optional_reads:
                if f not in all_fields:
                    self.add(path, f"{what} '{f}', which is not a Req field", stage=cls.__name__,
                             hint=did_you_mean(f, all_fields))
            for f, path, what in reads:
                # an unknown stage could write anything: only judge stages before it. A callback may
                # also read what its own stage writes (the stage calls it after writing those), and what
                # an earlier stage may write (whether it does can depend on that stage's callbacks).
                also = maybe | contract.writes if path != ("stages", i) else frozenset()
                if i < first_unknown and f in all_fields and f not in available and f not in also:
                    self.add(path, f"{what} '{f}' but no earlier stage writes it and the request does not supply it",
                             stage=cls.__name__, hint=self._producers_hint(f, i, writers_in_pipeline))
            for f in sorted(contract.writes | contract.optional_writes):
                if f not in all_fields:
                    self.add(("stages", i), f"writes '{f}', which is not a Req field", stage=cls.__name__,
                             hint=did_you_mean(f, all_fields) or "a stage that adds a field lists it in "
                                                                  "its contract's `declares`")
            available |= contract.writes
            maybe |= contract.optional_writes
            group = taken.setdefault(cls.callback_group(), {})
            for spec in contract.callbacks:
                group.setdefault(spec.name, (spec, cls.__name__))
            if valid:
                # callbacks' reads join the stage's, but for what the stage writes before calling them
                contract = replace(contract, reads=contract.reads | ({f for f, _, _ in reads} - contract.writes),
                                   optional_reads=contract.optional_reads
                                   | ({f for f, _, _ in optional_reads} - contract.writes))
                plan.append(PlannedStage(i, cls, args, contract))

        self._check_callbacks(given_callbacks, taken, certain)
        self._check_module_targets()
        if certain and "output" not in available:
            self.add(("stages",), "no stage writes 'output', so the pipeline would produce nothing",
                     hint="end the pipeline with a stage that writes it, e.g. DecodingStage")
        if certain:
            for name in sorted(modules - used_modules):
                self.add(("modules", name), f"module '{name}' is listed but no stage uses it",
                         hint="remove it, or reference it from a stage argument")
        return plan

    def _declared_state(self, contracts: list, request: set[str]) -> dict[str, str]:
        """The state fields stages add to the Req (name -> doc); a name that is already a field is refused."""
        declared: dict[str, str] = {}
        for i, cls, _, contract, _ in contracts:
            for name, doc in contract.declares.items():
                if name in Req.field_names() or name in request or not name.isidentifier():
                    what = "is already a Req field" if name.isidentifier() else "is not a Python identifier"
                    self.add(("stages", i), f"declares the new field '{name}', which {what}", stage=cls.__name__)
                else:
                    declared.setdefault(name, doc)
        return declared

    def _callback_reads(self, cls: type[PipelineStage], contract: Contract,
                        given: dict) -> list[tuple[str, tuple, str, bool]]:
        """(field, YAML path, callback name, optional) for what the stage's callbacks declare they read
        (@reads); a default callback (the stage's own method) is covered by the stage's contract."""
        group = cls.callback_group()
        entries = given.get(group) if isinstance(given.get(group), dict) else {}
        out = []
        for spec in contract.callbacks:
            target = entries.get(spec.name)
            callbacks = callback_allowlist(self.allowlist)
            if not isinstance(target, str) or not is_allowed(target, callbacks):
                continue  # reported by the callback checks
            try:
                fn = resolve(target, callbacks)
            except DiffstageError:
                continue  # reported by the callback checks
            needed, optional = declared_reads(fn)
            path = ("pipeline_config", "callbacks", group, spec.name)
            out += [(f, path, f"{group}.{spec.name}", False) for f in sorted(needed)]
            out += [(f, path, f"{group}.{spec.name}", True) for f in sorted(optional - needed)]
        return out

    def _check_module_targets(self) -> None:
        for name, spec in self._mapping("modules").items():
            target = spec.get("_target_") if isinstance(spec, dict) else None
            if not isinstance(target, str):
                continue
            path = ("modules", name, "_target_")
            cls = self._resolve(path, target, "cannot resolve module class")
            if cls is not None:
                try:
                    module_kind(cls)
                except DiffstageError as e:
                    self.add(path, f"module '{name}': {e}")

    def _producers_hint(self, f: str, i: int, writers: dict[str, list[int]]) -> str:
        later = [j for j in writers.get(f, []) if j > i and f not in self.reads_of.get(j, ())]
        if later:
            return f"stages[{later[0]}] writes it: move that stage before stages[{i}]"
        producers = sorted({c.__name__ for c in self.known_stages
                            if f in (*c.writes, *c.optional_writes) and f not in c.reads})
        if producers:
            return f"add a stage that writes it before stages[{i}], e.g. {', '.join(producers)}"
        return "no known stage writes it; add one that does"

    def _check_callbacks(self, given: dict, taken: dict[str, dict], certain: bool) -> None:
        base = ("pipeline_config", "callbacks")
        for group, entries in given.items():
            if not isinstance(entries, dict):
                continue  # the schema check reports the type
            known_group = group in taken
            if not known_group and certain:
                with_callbacks = sorted(g for g, specs in taken.items() if specs)
                self.add(base + (group,), f"no stage in this pipeline calls callbacks of group '{group}'",
                         hint=did_you_mean(group, with_callbacks) or
                         f"groups used here: {', '.join(with_callbacks) or 'none'}")
            for name, target in entries.items():
                path = base + (group, name)
                spec, stage_name = taken.get(group, {}).get(name, (None, None))
                if known_group and spec is None:
                    self.add(path, f"callback '{name}' is not called by any stage of group '{group}'",
                             hint=did_you_mean(name, taken[group]) or f"callbacks of '{group}': {', '.join(sorted(taken[group]))}")
                # Targets are checked even when the group is unknown: the allowlist comes first.
                self._check_callback_target(path, spec, stage_name, target)
        for group, specs in taken.items():
            for name, (spec, stage_name) in specs.items():
                if spec.required and name not in (given.get(group) or {}):
                    self.add(base + (group,), f"missing required callback '{group}.{name}'", stage=stage_name,
                             hint=f"signature: {name}({', '.join(spec.params)}); {spec.doc}".rstrip("; "))

    def _check_callback_target(self, path: tuple, spec, stage_name: str, target: Any) -> None:
        if not isinstance(target, str):
            return
        callbacks = callback_allowlist(self.allowlist)
        if is_allowed(target, self.allowlist) and not is_allowed(target, callbacks):
            self.add(path, f"{shown(target)} cannot be a callback: {CALLBACK_HINT}")
            return
        fn = self._resolve(path, target, "cannot resolve callback")
        if fn is None:
            return
        if not callable(fn):
            self.add(path, f"'{target}' is not callable")
        elif spec is not None and not accepts_positional(fn, len(spec.params)):
            self.add(path, f"callback '{target}' cannot be called as {spec.name}({', '.join(spec.params)})",
                     stage=stage_name)


def check_contracts(data: dict, file: str, lines: LineMap, allowlist: Iterable[str],
                    known_stages: Iterable[type[PipelineStage]]
                    ) -> tuple[list[PlannedStage], list[Problem], dict[str, str]]:
    """(the stages that passed, every problem, the state fields the stages declare: name -> doc)."""
    checker = _Checker(data, file, lines, allowlist, known_stages)
    plan = checker.run()
    return plan, checker.problems, checker.declared_state
