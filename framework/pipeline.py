"""Pipeline: runs a Req through the checked stages and records per-stage time and memory."""
from __future__ import annotations

import contextlib
import copy
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import ConcurrentUseError, DiffstageError, RequestError, StageError, clipped, did_you_mean
from .memory import check_fits
from .req import Req, recording_reads, unrecorded
from .setting_use import given_settings, ignored_settings, warn_ignored
from .reuse import DEFAULT_MAX_BYTES, ReuseCache
from .run_hooks import RunHook
from .spec import ModelSpec
from .stage import PipelineStage


def make_request(defaults: dict[str, Any], req_cls: type[Req] = Req, **kwargs: Any) -> Req:
    """A Req from sampling defaults and the caller's arguments (None means "use the default")."""
    allowed = req_cls.request_fields()
    unknown = [k for k in kwargs if k not in allowed]
    if unknown:
        hints = [f"'{k}'" + (f" ({did_you_mean(k, allowed)})" if did_you_mean(k, allowed) else "") for k in unknown]
        raise RequestError(f"unknown request argument{'s' if len(unknown) > 1 else ''} {', '.join(hints)}; "
                           f"accepted: {', '.join(sorted(allowed))}")
    values = {k: v for k, v in defaults.items() if v is not None and k in allowed}
    values.update({k: v for k, v in kwargs.items() if v is not None})
    return req_cls(**values)


def request_problems(req: Req, stages: list[PipelineStage]) -> list[str]:
    """Everything wrong with `req` that `stages` can tell before running. The declared fields are checked
    first, then the stages fill in the defaults that follow from them (`complete_request`) and check the rest."""
    problems = req.declared_field_problems()
    if problems:
        return problems
    for stage in stages:
        stage.complete_request(req)
    return [msg for stage in stages for msg in stage.request_problems(req)]


def raise_request_problems(req: Req, stages: list[PipelineStage]) -> None:
    """RequestError listing everything `request_problems` finds, if anything."""
    problems = request_problems(req, stages)
    if problems:
        raise RequestError("invalid request:\n" + "\n".join(f"  - {m}" for m in problems))


def checked_request(defaults: dict[str, Any], req_cls: type[Req], stages: list[PipelineStage],
                    fields: dict[str, Any]) -> Req:
    """The request `fields` make over `defaults`, checked by `stages` (RequestError: every problem)."""
    req = make_request(defaults, req_cls=req_cls, **fields)
    raise_request_problems(req, stages)
    return req


@dataclass
class PipelineOutput:
    images: Any  # list of PIL images (videos: a list of frame lists), or an array/tensor for np/pt/latent
    timings: dict[str, float] = field(default_factory=dict)  # stage label -> seconds
    peak_memory: dict[str, int] = field(default_factory=dict)  # stage label -> bytes (CUDA only)
    req: Req | None = None
    reused: list[str] = field(default_factory=list)  # labels of the stages whose outputs came from the reuse cache
    reports: dict[str, dict] = field(default_factory=dict)  # stage label -> its report() (step cache counts)
    ignored: dict[str, str] = field(default_factory=dict)  # setting -> why it had no effect (setting_use.py)

    @property
    def frames(self) -> Any:
        """The same output under the name Diffusers' video pipelines use."""
        return self.images


class Pipeline:
    def __init__(self, spec: ModelSpec, stages: list[PipelineStage], modules: dict[str, Any],
                 defaults: dict[str, Any] | None = None, source: str | None = None,
                 config: dict[str, Any] | None = None, checkpoint: str | None = None,
                 device: torch.device | str = "cpu", req_cls: type[Req] = Req, reuse: ReuseCache | None = None,
                 reuse_max_bytes: int = DEFAULT_MAX_BYTES, module_keys: dict[int, str] | None = None,
                 hooks: list[RunHook] | None = None):
        self.spec = spec
        self.stages = list(stages)
        self.modules = modules
        self.defaults = dict(defaults or {})  # sampling defaults, already merged with overrides
        self.source = source  # the model YAML file
        self.config = config or {}  # the resolved run config, for provenance
        self.checkpoint = checkpoint  # where the modules were loaded from
        self.device = torch.device(device)  # where the stages allocate (for the memory check)
        self.req_cls = req_cls  # Req with the fields this model's YAML and stages declare
        # Stage-output reuse (see reuse.py): the session's cache, or None (off); the most this pipeline's
        # entries may hold (reuse.max_mb); module ids -> where they were loaded from.
        self.reuse = reuse
        self.reuse_max_bytes = reuse_max_bytes
        self.module_keys = dict(module_keys or {})
        self.hooks = list(hooks or [])  # around each run and stage (run_hooks.py): adapters, offload
        # Stages share stateful modules (a scheduler keeps its timesteps): one run at a time.
        self._lock = threading.Lock()
        self._running_in: int | None = None  # thread id of the run in progress
        self._stage_index: int | None = None  # the stage it is in (for preview)

    def stage_labels(self) -> list[str]:
        return [f"{i}:{type(s).__name__}" for i, s in enumerate(self.stages)]

    def make_request(self, **kwargs: Any) -> Req:
        return make_request(self.defaults, req_cls=self.req_cls, **kwargs)

    def __call__(self, prompt: str | list[str] | None = None, **kwargs: Any) -> PipelineOutput:
        """Generate, like a Diffusers pipeline: `pipe(prompt, seed=0, num_inference_steps=4).images[0]`."""
        return self.run(self.make_request(prompt=prompt, **kwargs))

    def check_request(self, req: Req) -> None:
        """Every stage's objections to `req`, then the memory it would need; raises RequestError."""
        raise_request_problems(req, self.stages)
        if isinstance(req.seed, (list, tuple)) and not self.takes_seed_lists():
            raise RequestError(f"seed is a list, but {self.seed_list_problem()}: give one seed")
        estimates: dict[str, int] = {}
        for stage in self.stages:
            for what, n in stage.memory_estimate(req).items():
                estimates[what] = estimates.get(what, 0) + n
        for hook in self.hooks:  # weights a hook loads for the stages (runtime.offload)
            estimates.update(hook.memory_estimate(self.stages, req))
        check_fits(estimates, self.device)

    def takes_seed_lists(self) -> bool:
        """Whether a request may give one seed per prompt (a server batches requests of different seeds so)."""
        return self.seed_list_problem() is None

    def seed_list_problem(self) -> str | None:
        """Why a request may not give one seed per prompt: no stage draws noise per prompt, or one (a stochastic
        scheduler's step) draws from one generator for the whole batch."""
        if not any(getattr(stage, "per_prompt_seeds", False) for stage in self.stages):
            return "no stage of this pipeline draws noise per prompt (diffstage's LatentPreparationStage does)"
        return next((why for stage in self.stages if hasattr(stage, "seed_list_problem")
                     and (why := stage.seed_list_problem()) is not None), None)

    def preview(self, req: Req, latents: Any) -> Any:
        """What the stages after the running one make of `latents` (a denoising stage's latents so far), as PIL
        images: a server's streaming preview. Only from inside a run of this pipeline (its step observer)."""
        if self._running_in != threading.get_ident() or self._stage_index is None:
            raise ConcurrentUseError("Pipeline.preview runs the remaining stages of a run in progress; call it from "
                                     "that run's step observer (diffstage.run_events.observing)")
        draft = copy.copy(req)
        draft.latents, draft.output_type = latents, "pil"
        with unrecorded():  # a preview uses no setting the run did not
            for stage in self.stages[self._stage_index + 1:]:
                for hook in self.hooks:
                    hook.before_stage(stage, draft)
                draft = stage(draft)
                for hook in self.hooks:
                    hook.after_stage(stage, draft)
        return draft.output

    def run(self, req: Req) -> PipelineOutput:
        """Run `req` through the stages. Calls from several threads take turns; a call from inside a
        run (a callback or step hook calling the pipeline) is refused, as it would corrupt that run."""
        if not isinstance(req, Req):
            raise RequestError(f"Pipeline.run takes a Req (see Pipeline.make_request), got {type(req).__name__}; "
                               "or call the pipeline: pipe(prompt, seed=0, ...)")
        if self._running_in == threading.get_ident():
            raise ConcurrentUseError("this pipeline was called from inside one of its own runs (a callback or step "
                                     "hook calling it); a run must finish before the next one starts")
        with self._lock:
            self._running_in = threading.get_ident()
            try:
                self.check_request(req)
                given = given_settings(req, self.spec)
                with recording_reads() as reads, contextlib.ExitStack() as around:  # reads: settings used
                    for hook in self.hooks:
                        around.enter_context(hook.around_run(req))
                    out = self._run_stages(req)
            finally:
                self._running_in = self._stage_index = None
        out.ignored = ignored_settings(given, reads, self.spec, self.stages)
        warn_ignored(out.ignored)
        return out

    @torch.inference_mode()
    def _run_stages(self, req: Req) -> PipelineOutput:
        timings, memory, reused = {}, {}, []
        cuda = torch.cuda.is_available()
        module_keys = self.run_module_keys(req)
        for index, (label, stage) in enumerate(zip(self.stage_labels(), self.stages)):
            self._stage_index = index
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            key = self.reuse.signature(stage, req, module_keys) if self.reuse is not None else None
            outputs = self.reuse.get(key) if key is not None else None
            if outputs is not None:
                for name, value in outputs.items():
                    setattr(req, name, value)
                reused.append(label)
                timings[label] = time.perf_counter() - start
                continue
            try:
                for hook in self.hooks:
                    hook.before_stage(stage, req)
                req = stage(req)
                for hook in self.hooks:
                    hook.after_stage(stage, req)
                if key is not None:
                    contract = stage.declared
                    self.reuse.put(key, {f: getattr(req, f) for f in sorted(contract.writes | contract.optional_writes)},
                                   self.reuse_max_bytes)
            except DiffstageError:
                raise
            except Exception as e:  # name the stage; the original error (and traceback) is the cause
                raise StageError(f"stages[{label.replace(':', '] ', 1)} failed: {type(e).__name__}: "
                                 f"{clipped(str(e).strip(), 300)} (DIFFSTAGE_DEBUG=1 shows the traceback)") from e
            if cuda:
                torch.cuda.synchronize()
                memory[label] = torch.cuda.max_memory_allocated()
            timings[label] = time.perf_counter() - start
        reports = {label: r for label, stage in zip(self.stage_labels(), self.stages)
                   if label not in reused and (r := stage.report()) is not None}
        return PipelineOutput(images=req.output, timings=timings, peak_memory=memory, req=req, reused=reused,
                              reports=reports)

    def run_module_keys(self, req: Req) -> dict[int, str]:
        """Module ids -> the keys the reuse cache knows them by in a run of `req` (hooks may change them)."""
        keys = dict(self.module_keys)
        for hook in self.hooks:
            for module in self.modules.values():
                if id(module) in keys:
                    keys[id(module)] = hook.module_key(module, keys[id(module)], req)
        return keys

    def fuse_loras(self, loras: list[dict]) -> None:
        """Merge LoRA adapters ([{path, scale}]) into the weights, for many requests with one set: they become
        this pipeline's default, and a request for another set is refused until unfuse_loras() (lora.py)."""
        with self._lock:
            self.defaults["loras"] = self._adapters().fuse(loras, self.defaults.get("loras"))

    def unfuse_loras(self) -> None:
        """Restore the weights from before fuse_loras, and the default adapters."""
        with self._lock:
            self.defaults["loras"] = self._adapters().unfuse()

    def _adapters(self) -> Any:
        from .lora import LoraAdapters

        hook = next((h for h in self.hooks if isinstance(h, LoraAdapters)), None)
        if hook is None:
            raise DiffstageError("this pipeline takes no LoRA adapters (it was built without diffstage's builder)")
        return hook

    def graph(self) -> list[tuple[str, str, str]]:
        """Data-flow edges (producer, consumer, field) derived from declared reads/writes."""
        edges, last_writer = [], {}
        labels = self.stage_labels()
        for label, stage in zip(labels, self.stages):
            contract = stage.declared
            reads = contract.reads | contract.optional_reads if contract else set(stage.reads)
            writes = contract.writes | contract.optional_writes if contract else set(stage.writes)
            for f in sorted(reads):
                if f in last_writer:
                    edges.append((last_writer[f], label, f))
            for f in writes:
                last_writer[f] = label
        return edges

    def __repr__(self) -> str:
        body = "\n".join(f"  {label}" for label in self.stage_labels())
        return f"Pipeline({self.spec.name}, {self.spec.pipeline_name}, stages:\n{body}\n)"

