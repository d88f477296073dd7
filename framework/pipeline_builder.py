"""PipelineBuilder: make, edit, check, build and save a pipeline from Python, with the checks a YAML gets.

    b = PipelineBuilder.from_yaml("my_model")
    b.set_args("denoising", cfg_batch=False)
    b.set_callback("denoising", "combine_cfg", my_combine)   # a function, or a dotted path
    b.insert("decoding", MyStage, strength=0.5)             # before the stage named "decoding"
    b.check()                                               # [] when sound; else the problems
    pipe = b.build(model_path="ckpt/")
    b.to_yaml("my_model.yaml")                              # diffstage validate accepts it

The builder holds the model as YAML data (the same mapping a model YAML file holds), so `check()` is the
YAML check and `to_yaml` writes exactly what `build` runs. Stage classes and callbacks may be given as
Python objects: they are used as they are (no allowlist: the caller already holds them), and written to
YAML by their dotted path, which a function defined inside another function does not have."""
from __future__ import annotations

import copy
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

from .builder import build_from_config, compose_config
from .errors import DiffstageError, Problem, SpecError, did_you_mean, shown
from .model_check import check_data
from .model_yaml import load_model_yaml
from .object_refs import UNSAVED, plain_data, reference, references, stage_entry
from .models_dir import model_yaml
from .output_files import write_new
from .resolve import DEFAULT_ALLOWLIST, given_objects, is_allowed
from .stage import PipelineStage, _snake
from .yaml_lines import MAX_DEPTH, LineMap
from .yaml_write import yaml_text

class PipelineBuilder:
    """A model spec under construction. Stages are addressed by index or by name: a stage's name is
    the one it was given (`name=`, kept in the YAML as `_name_`), else its class name in snake case
    without "Stage" (`text_encoding`), with `_2`, `_3` ... for a second and third of one class."""

    def __init__(self, name: str, pipeline_name: str, task: str = "t2i", *, description: str = "",
                 allowlist: Iterable[str] = ()):
        self.data: dict[str, Any] = {"name": name, "description": description, "pipeline_name": pipeline_name,
                                     "task": task, "modules": {}, "pipeline_config": {"settings": {}, "callbacks": {}},
                                     "sampling": {}, "stages": []}
        self.allowlist = tuple([allowlist] if isinstance(allowlist, str) else allowlist)
        self.objects: dict[str, Any] = {}  # name used in `data` -> the Python object it stands for
        self.source: Path | None = None  # the YAML it was read from

    @classmethod
    def from_yaml(cls, name_or_path: str | os.PathLike, allowlist: Iterable[str] = ()) -> PipelineBuilder:
        """A builder holding a model YAML (a shipped name or a path; `extends` is followed)."""
        file = model_yaml(str(name_or_path))
        data, lines = load_model_yaml(file)
        if lines.problems:
            raise SpecError(lines.problems)
        if not isinstance(data, dict):
            raise DiffstageError(f"{file}: a model YAML must be a mapping, got {shown(data)}")
        builder = cls(str(data.get("name")), str(data.get("pipeline_name")), allowlist=allowlist)
        builder.data, builder.source = plain_data(data), file
        return builder

    @property
    def label(self) -> str:
        """Where problems are, in messages: this builder (and the YAML it came from)."""
        origin = f" from {self.source.name}" if self.source else ""
        return f"<PipelineBuilder '{self.data.get('name')}'{origin}>"

    # --- stages -----------------------------------------------------------------------------------------
    def stage_names(self) -> list[str]:
        names, seen = [], {}
        for entry in self._stages():
            base = entry.get("_name_") if isinstance(entry, dict) and entry.get("_name_") else self._class_name(entry)
            seen[base] = seen.get(base, 0) + 1
            names.append(base if seen[base] == 1 else f"{base}_{seen[base]}")
        return names

    def stage(self, ref: int | str) -> dict[str, Any]:
        """A copy of one stage's entry: `_target_` and its arguments."""
        return copy.deepcopy(self._stages()[self._index(ref)])

    def insert(self, position: int | str, stage: Any, *, name: str | None = None, **args: Any) -> PipelineBuilder:
        """Insert `stage` at index `position`, or before the stage named `position`. `stage` is a stage
        class, a dotted path, or a stage instance (its class and the arguments it was made with; modules
        it was given are replaced by the pipeline's own at build). `args` are its YAML arguments."""
        stages = self._stages()
        index = len(stages) if position == len(stages) else self._index(position)
        entry = stage_entry(self.objects, stage, args, name)
        self._check_names(stages[:index] + [entry] + stages[index:])
        stages.insert(index, entry)
        return self

    def append(self, stage: Any, *, name: str | None = None, **args: Any) -> PipelineBuilder:
        return self.insert(len(self._stages()), stage, name=name, **args)

    def replace(self, ref: int | str, stage: Any, *, name: str | None = None, **args: Any) -> PipelineBuilder:
        stages = self._stages()
        index = self._index(ref)
        old = stages[index]
        keep = old.get("_name_") if isinstance(old, dict) else None
        entry = stage_entry(self.objects, stage, args, name or keep)
        self._check_names(stages[:index] + [entry] + stages[index + 1:])
        stages[index] = entry
        return self

    def remove(self, ref: int | str) -> PipelineBuilder:
        del self._stages()[self._index(ref)]
        return self

    def set_args(self, ref: int | str, **args: Any) -> PipelineBuilder:
        """Set arguments of a stage (a value of None removes the argument: the stage's default applies)."""
        entry = self._stages()[self._index(ref)]
        for key, value in args.items():
            if key in ("_target_", "_name_"):
                raise DiffstageError(f"set_args cannot set '{key}'; use replace() for another class")
            if value is None:
                entry.pop(key, None)
            else:
                entry[key] = plain_data(value)
        return self

    # --- callbacks, modules, settings, sampling -----------------------------------------------------------
    def set_callback(self, group: str, name: str, fn: Any) -> PipelineBuilder:
        """Set callback `group.name` to a function or a dotted path (None removes it)."""
        for what, value in (("group", group), ("name", name)):
            if not (isinstance(value, str) and value.isidentifier()):
                raise DiffstageError(f"set_callback: the callback {what} must be an identifier, got {shown(value)}")
        callbacks = self.data.setdefault("pipeline_config", {}).setdefault("callbacks", {})
        if fn is None:
            callbacks.get(group, {}).pop(name, None)
            if group in callbacks and not callbacks[group]:
                del callbacks[group]
            return self
        callbacks.setdefault(group, {})[name] = reference(self.objects, fn, "callback")
        return self

    def set_module(self, name: str, target: Any = None, *, subfolder: str | None = None,
                   dtype: str | None = None) -> PipelineBuilder:
        """Declare module `name` (its class: `target`, default the checkpoint's model_index.json)."""
        spec = {k: v for k, v in (("_target_", None if target is None else reference(self.objects, target, "module class")),
                                  ("subfolder", subfolder), ("dtype", dtype)) if v is not None}
        self.data.setdefault("modules", {})[name] = spec or None
        return self

    def remove_module(self, name: str) -> PipelineBuilder:
        modules = self.data.setdefault("modules", {})
        if name not in modules:
            raise DiffstageError(f"no module '{name}'" + self._options(name, modules, "modules"))
        del modules[name]
        return self

    def set_settings(self, **settings: Any) -> PipelineBuilder:
        """Set `pipeline_config.settings` (what callbacks read as `settings`); None removes a key."""
        return self._update(self.data.setdefault("pipeline_config", {}).setdefault("settings", {}), settings)

    def set_sampling(self, **defaults: Any) -> PipelineBuilder:
        """Set sampling defaults (`num_inference_steps=4`, ...); None removes one."""
        return self._update(self.data.setdefault("sampling", {}), defaults)

    def set(self, **fields: Any) -> PipelineBuilder:
        """Set top-level keys of the spec (`model_path`, `description`, `attention`, `request_fields`, ...)."""
        for key in fields:
            if key in ("stages", "modules", "pipeline_config", "sampling"):
                raise DiffstageError(f"set({key}=...): use the builder's methods for {key}")
        return self._update(self.data, fields)

    # --- check, build, save ---------------------------------------------------------------------------------
    def check(self) -> list[Problem]:
        """Every problem the YAML check would report, located in this builder instead of a file line, with
        those of writing it as YAML (values YAML cannot hold, the YAML reader's limits)."""
        problems = []
        try:
            yaml_text(self.data, self.label)
        except SpecError as e:
            problems += e.problems
        try:
            self._checked()
        except SpecError as e:
            problems += e.problems
        except RecursionError:  # data nested thousands deep: the YAML problems above already say where
            if not problems:
                raise
        return problems

    def build(self, model_path: str | os.PathLike | None = None, overrides: Sequence[str] = (), session=None):
        """The Pipeline, as build_pipeline makes it from a YAML (refused while check() finds problems);
        `session` as for build_pipeline."""
        from omegaconf import OmegaConf

        cfg = OmegaConf.to_container(compose_config(overrides), resolve=False)
        cfg["model"] = str(self.data.get("name"))  # provenance only: the spec is this builder's
        if model_path is not None:
            cfg["model_path"] = str(model_path)
        with given_objects(self.objects):
            return build_from_config(cfg, checked=self._checked(), session=session)

    def to_dict(self) -> dict[str, Any]:
        """The spec as YAML data (a copy)."""
        return copy.deepcopy(self.data)

    def to_yaml(self, path: str | os.PathLike) -> Path:
        """Write the spec as a new model YAML (an existing file is refused, not replaced); `diffstage validate
        PATH` accepts it and it builds the same pipeline. Refused when a callback or class has no import path
        (a function defined inside a function)."""
        unsaved = [f"{where}: {name[len(UNSAVED):]} has no import path" for where, name in references(self.data, self.stage_names())
                   if name.startswith(UNSAVED)]
        if unsaved:
            raise DiffstageError("cannot write this pipeline as YAML, which names callbacks and classes by dotted "
                                 "path:\n" + "\n".join(f"  - {u}" for u in unsaved)
                                 + "\n(define them at the top level of an importable module, or pass dotted paths)")
        outside = sorted({name.rsplit(".", 1)[0] for _, name in references(self.data, self.stage_names())
                          if not is_allowed(name, DEFAULT_ALLOWLIST)})
        header = f"# Written by diffstage.PipelineBuilder{f' from {self.source}' if self.source else ''}.\n"
        if outside:
            header += (f"# Its dotted paths need the allowlist: allowlist=[{', '.join(outside)}] "
                       f"(diffstage validate PATH {' '.join('--allow ' + o for o in outside)}).\n")
        text = yaml_text(self.data, str(path), header)  # what `diffstage validate` would refuse is not written
        return write_new(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), numbered=False)

    def __repr__(self) -> str:
        return f"PipelineBuilder({self.data.get('name')!r}, stages: {', '.join(self.stage_names())})"

    # --- internals ----------------------------------------------------------------------------------------
    def _stages(self) -> list:
        stages = self.data.setdefault("stages", [])
        if not isinstance(stages, list):
            raise DiffstageError(f"{self.label}: `stages` must be a list, got {shown(stages)}")
        return stages

    def _class_name(self, entry: Any) -> str:
        target = entry.get("_target_") if isinstance(entry, dict) else None
        if not isinstance(target, str):
            return "stage"
        cls = self.objects.get(target)
        return cls.default_name() if isinstance(cls, type) and issubclass(cls, PipelineStage) \
            else _snake(target.rsplit(".", 1)[-1])

    def _index(self, ref: int | str) -> int:
        stages = self._stages()
        if isinstance(ref, int) and not isinstance(ref, bool):
            if not -len(stages) <= ref < len(stages):
                raise DiffstageError(f"no stage at index {ref}: the pipeline has {len(stages)} stages")
            return ref % len(stages)
        names = self.stage_names()
        if ref not in names:
            raise DiffstageError(f"no stage named {shown(ref)}" + self._options(ref, names, "stages"))
        return names.index(ref)

    @staticmethod
    def _options(name: Any, options: Iterable[str], what: str) -> str:
        options = list(options)
        hint = did_you_mean(name, options)
        return f" ({hint})" if hint else f"; {what}: {', '.join(options) or 'none'}"

    def _check_names(self, stages: list) -> None:
        """Given names must be identifiers, and neither repeat nor take a name a stage has by default."""
        given = [e["_name_"] for e in stages if isinstance(e, dict) and e.get("_name_") is not None]
        defaults = {self._class_name(e) for e in stages if isinstance(e, dict) and e.get("_name_") is None}
        for name in given:
            if not (isinstance(name, str) and name.isidentifier()):
                raise DiffstageError(f"a stage name must be a Python identifier, got {shown(name)}")
            if given.count(name) > 1 or name in defaults:
                raise DiffstageError(f"two stages would be named '{name}'; give one another name")

    def _update(self, mapping: dict, values: dict) -> PipelineBuilder:
        for key, value in values.items():
            if value is None:
                mapping.pop(key, None)
            else:
                try:
                    mapping[key] = plain_data(value)
                except RecursionError:  # thousands of levels: far past what the YAML reader takes
                    raise DiffstageError(f"{key}: nested more than {MAX_DEPTH} levels deep; a model YAML needs far "
                                         "fewer") from None
        return self

    def _checked(self):
        """check_data on this spec, the builder's objects resolvable; problems located in the builder."""
        names = self.stage_names()
        try:
            with given_objects(self.objects):
                return check_data(self.to_dict(), self.label, LineMap(self.label), self.allowlist)
        except SpecError as e:
            raise SpecError([self._locate(p, names) for p in e.problems]) from None

    def _locate(self, problem: Problem, names: list[str]) -> Problem:
        """`stages[3].x` -> `stages[3] (denoising).x`: a stage's name says more than its index here."""
        match = re.match(r"stages\[(\d+)\]", problem.key or "")
        if match and int(match.group(1)) < len(names):
            key = f"{match.group(0)} ({names[int(match.group(1))]}){problem.key[match.end():]}"
            return Problem(problem.message, key, problem.file, problem.line, problem.hint, problem.stage)
        return problem
