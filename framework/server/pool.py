"""The models a server serves: each checked at start, loaded on first use (or at start with serve.preload), and
unloaded least-recently-used when the loaded weights pass serve.memory_budget_gb.

Each model has a session of its own (its module cache), so unloading it frees its weights; a request's step
cache (`cache`) picks a pipeline of that model built with that cache, over the same modules."""
from __future__ import annotations

import dataclasses
import functools
import threading
import time
from importlib import resources
from typing import Any

import yaml

from ..build_plan import BuildPlan, plan_build
from ..errors import DiffstageError, RequestError, did_you_mean, shown
from ..model_check import CheckedModel, check_model
from ..pipeline import Pipeline
from ..run_config import RunConfig
from ..session import Session


class NotFound(DiffstageError):
    """What a request names is not here (HTTP 404)."""


class UnknownModel(NotFound):
    """A request names a model this server does not serve."""


VIDEO_TASKS = ("t2v", "i2v", "ti2v")  # served by /v1/videos; the other tasks by /v1/images


@functools.lru_cache(maxsize=1)
def cache_kinds() -> dict[str, dict]:
    """The step caches a request may pick (`cache`): conf/cache's options, by name."""
    folder = resources.files("diffstage.conf") / "cache"
    return {f.name[:-5]: yaml.safe_load(f.read_text(encoding="utf-8"))
            for f in folder.iterdir() if f.name.endswith(".yaml")}


def weight_bytes(modules: dict[str, Any]) -> int:
    """Bytes of the distinct parameters and buffers of a pipeline's modules."""
    seen, total = set(), 0
    for module in modules.values():
        tensors = list(module.parameters()) + list(module.buffers()) if hasattr(module, "parameters") else []
        for t in tensors:
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


@dataclasses.dataclass(eq=False)
class ServedModel:
    name: str  # what requests call it: the model YAML's `name`
    checked: CheckedModel
    run: RunConfig  # the server's run config, with `model` set to this one
    session: Session = dataclasses.field(default_factory=Session)
    pipelines: dict[str, Pipeline] = dataclasses.field(default_factory=dict)  # step cache kind -> pipeline
    plans: dict[str, BuildPlan] = dataclasses.field(default_factory=dict)
    last_used: float = 0.0
    in_use: int = 0  # calls running or about to: never unloaded under them (ModelPool.acquire/release)
    bytes: int = 0

    @property
    def task(self) -> str:
        return self.checked.spec.task.value

    @property
    def makes_videos(self) -> bool:
        return self.task in VIDEO_TASKS

    def cache_kind(self, cache: Any) -> str:
        """The step cache a request asks for (None: the server's); RequestError for an unknown one."""
        if cache is None:
            return str((self.run.cache or {}).get("kind", "none"))
        if cache not in cache_kinds():
            raise RequestError(f"cache must be one of {', '.join(sorted(cache_kinds()))}, got {shown(cache)}")
        return cache

    def plan(self, kind: str) -> BuildPlan:
        if kind not in self.plans:
            own = (self.run.cache or {}).get("kind", "none") == kind
            run = self.run if own else dataclasses.replace(self.run, cache=dict(cache_kinds()[kind]))
            self.plans[kind] = plan_build(run, self.checked)
        return self.plans[kind]

    def unload(self) -> None:
        self.pipelines.clear()
        self.session = Session()
        self.bytes = 0


class ModelPool:
    def __init__(self, run: RunConfig, models: tuple[tuple[str, str | None], ...] | None,
                 memory_budget_gb: float | None = None):
        self.models: dict[str, ServedModel] = {}
        self.aliases: dict[str, str] = {}  # the names given in serve.models -> the model's name
        self.budget = int(memory_budget_gb * 2 ** 30) if memory_budget_gb else None
        self._loading = threading.Lock()  # held while a model loads
        self._books = threading.Lock()  # in_use, pipelines and eviction, briefly
        for given, model_path in models or ((run.model, run.model_path),):
            checked = check_model(given, run.allowlist)  # every model checked before the server starts
            name = checked.spec.name
            if name in self.models:
                raise DiffstageError(f"serve.models names model '{name}' twice ({given})")
            # the run config's model_path is its `model`'s; another model's is its entry's or its YAML's
            path = model_path or (run.model_path if given == run.model else None)
            self.models[name] = ServedModel(name, checked, dataclasses.replace(run, model=given, model_path=path))
            self.aliases[given] = name

    def names(self) -> list[str]:
        return list(self.models)

    def get(self, name: Any) -> ServedModel:
        """The model a request names (None: the first served); UnknownModel (404) otherwise."""
        if name is None:
            return next(iter(self.models.values()))
        key = self.aliases.get(name, name) if isinstance(name, str) else name
        if key not in self.models:
            hint = did_you_mean(str(name), list(self.models)) if isinstance(name, str) else None
            raise UnknownModel(f"model {shown(name)} is not served here" + (f" ({hint})" if hint else "")
                               + f"; served: {', '.join(self.models)}")
        return self.models[key]

    def acquire(self, model: ServedModel, kind: str) -> Pipeline:
        """The model's pipeline with step cache `kind`, loaded now if it is not (unloading idle models past the
        budget); the model is in use, and never unloaded, until `release`."""
        with self._books:
            model.in_use += 1
            model.last_used = time.monotonic()
            pipe = model.pipelines.get(kind)
        if pipe is not None:
            return pipe
        try:
            with self._loading:  # one load at a time; requests to loaded models go on meanwhile
                if kind not in model.pipelines:
                    pipe = model.plan(kind).load(model.session)
                    with self._books:
                        model.pipelines[kind] = pipe
                        model.bytes = max(model.bytes, weight_bytes(pipe.modules))
                        self._evict(keep=model)
                return model.pipelines[kind]
        except BaseException:
            self.release(model)
            raise

    def release(self, model: ServedModel) -> None:
        with self._books:
            model.in_use -= 1

    def _evict(self, keep: ServedModel) -> None:
        """Unload the least recently used idle models while the loaded weights pass the budget."""
        if self.budget is None:
            return
        loaded = sorted((m for m in self.models.values() if m.pipelines and m is not keep and not m.in_use),
                        key=lambda m: m.last_used)
        while loaded and sum(m.bytes for m in self.models.values()) > self.budget:
            loaded.pop(0).unload()

    def loaded(self) -> list[str]:
        return [name for name, m in self.models.items() if m.pipelines]
