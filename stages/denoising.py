"""DenoisingStage: the sampling loop, with classifier-free guidance and per-step hooks."""
from __future__ import annotations

import inspect
from collections.abc import Callable, Collection

import torch
from tqdm.auto import tqdm

from diffstage.distributed import current, gather_output, sequence_parallel, shard_inputs
from diffstage.distributed.sequence import TRAFFIC
from diffstage.distributed.split_plan import PLAN as SPLIT_PLAN, split_sequence
from diffstage.attention.route import ROUTED, routed_attention
from diffstage.attention.layer import DEFAULT_BACKEND
from diffstage.forward_args import missing_argument
from diffstage.req import Req
from diffstage.run_events import report_step
from diffstage.sampling import check_finite_latents, seed_list_problem
from diffstage.stage import CallbackSpec, Contract, PipelineStage
from diffstage.block_cache import cached_blocks, step_cache_route
from diffstage.step_cache import StepCache

from .cfg_join import UNJOINABLE, join_branches

# Signature of a step hook: hook(stage, req, step_index, t, noise_pred) -> noise_pred | None.
# Hooks run after the model call and before the scheduler step (step caches act inside the transformer).
StepHook = Callable[..., "torch.Tensor | None"]


class DenoisingStage(PipelineStage):
    """Runs the transformer over the schedule.

    Args:
        conditioning: Req fields the model is conditioned on; with CFG their
            `negative_` counterparts are used for the unconditional branch.
        latents_arg / timestep_arg: the transformer's keyword names for the
            noisy latents and the timestep.
        cfg_batch: with CFG, run both branches in one transformer call when their
            inputs allow it (per-sample tensors have the batch first; an input both
            branches share is the same object, e.g. position ids). Off: two calls.
        scale_model_input: call the scheduler's `scale_model_input` on the model's
            input when it has one (Euler, DPM: as Diffusers' UNet pipelines do).
        progress: show a tqdm progress bar.

    A step cache (`set_step_cache`, or `cache=...` in the run config) lets the transformer skip its
    blocks on steps where its input barely changed; `report()` counts the calls computed and cached.

    The noise is scaled by the scheduler's `init_noise_sigma` first (1 for flow matching), unless it is an input
    image's latents already noised to the first timestep (`latents_noised`, ImageNoisingStage).
    """

    reads = ("latents", "timesteps", "do_cfg", "cfg_scale")
    writes = ("latents",)
    module_params = ("transformer", "scheduler")
    callback_specs = (
        CallbackSpec("model_inputs", ("req", "settings", "transformer", "negative"), required=True,
                     doc="returns the transformer's conditioning kwargs for one branch (fixed over steps)"),
        CallbackSpec("timestep_input", ("t", "req", "settings"),
                     doc="returns the timestep tensor the transformer takes (default: t for each batch item)"),
        CallbackSpec("latent_input", ("latents", "req", "settings"),
                     doc="returns the transformer's latent input for the current latents (default: unchanged), e.g. "
                         "with an input image's latents appended to the sequence; the prediction then covers those "
                         "tokens too: postprocess_prediction drops them"),
        CallbackSpec("combine_cfg", ("cond", "uncond", "scale"),
                     doc="combines the two predictions (default: uncond + scale * (cond - uncond))"),
        CallbackSpec("postprocess_prediction", ("pred", "req", "settings"),
                     doc="adjusts the (combined) prediction before the scheduler step, with and without CFG, "
                         "e.g. drops a learned-sigma half (default: unchanged)"),
        CallbackSpec("step_kwargs", ("req", "settings", "scheduler"),
                     doc="extra keyword arguments of scheduler.step (default: the request's generator and "
                         "settings.eta, where the step takes them, as Diffusers does)"),
    )

    def __init__(self, transformer, scheduler, conditioning: tuple[str, ...] = ("prompt_embeds",),
                 latents_arg: str = "hidden_states", timestep_arg: str = "timestep", cfg_batch: bool = True,
                 scale_model_input: bool = True, progress: bool = True):
        super().__init__()
        self.transformer = transformer
        self.scheduler = scheduler
        self.conditioning = list(conditioning)
        self.latents_arg = latents_arg
        self.timestep_arg = timestep_arg
        self.cfg_batch = cfg_batch
        self.scale_model_input = scale_model_input
        self.progress = progress
        self.step_hooks: list[StepHook] = []
        self.step_cache: StepCache | None = None
        self.cache_route = "argument"  # how the transformer takes it: an argument (native) or declared blocks
        self.last_cache_stats: dict | None = None
        self.attention_backend = DEFAULT_BACKEND  # for a stock transformer's routed attention (the run's choice)
        self._check_parallel()
        problem = missing_argument(transformer, latents_arg=latents_arg, timestep_arg=timestep_arg)
        if problem:  # refused when the pipeline is built, not on the first step
            raise ValueError(problem)

    def set_step_cache(self, cache: StepCache | None, declared: Collection = ()) -> None:
        """Run with `cache` (None: without): its settings; each run gets a cache of its own (for_run).
        The transformer must support step caches: natively, or through its blocks when it is in `declared`
        (the modules whose blocks the model YAML declares: build_plan.apply_acceleration)."""
        if cache is not None:
            self.cache_route = step_cache_route(self.transformer, cache.kind,
                                                any(m is self.transformer for m in declared))  # or ValueError
        self.step_cache = cache

    def report(self) -> dict | None:
        """The step cache's counts for the last run: model calls computed and taken from the cache."""
        return {"step_cache": self.last_cache_stats} if self.last_cache_stats is not None else None

    def _check_parallel(self) -> None:
        """Sequence parallelism needs a transformer that says how to split its inputs: a native model's plan, or
        a stock one's split plan (its model YAML's acceleration declaration, or the class's _cp_plan)."""
        state = current()
        if state.sequence == 1 or self.transformer is None:
            return
        name = type(self.transformer).__name__
        if not hasattr(self.transformer, "sequence_parallel_plan") and not hasattr(self.transformer, SPLIT_PLAN):
            raise ValueError(f"parallel.ulysses / parallel.ring split the transformer's sequence, but {name} "
                             "declares no sequence_parallel_plan (diffstage's native transformers do), and its "
                             "model YAML no split plan: declare `acceleration.<module>.sequence`, or "
                             "`acceleration: {<module>: {}}` for the class's Diffusers _cp_plan where it has one "
                             "(see the README's \"Adding a model\"); or use parallel.cfg")
        if not hasattr(self.transformer, "sequence_parallel_plan") and not getattr(self.transformer, ROUTED, None):
            raise ValueError(f"parallel.ulysses / parallel.ring: {name} has a split plan but no attention module "
                             "with a Diffusers attention processor, so its attention would see only each rank's "
                             "tokens; use parallel.cfg")
        heads = getattr(getattr(self.transformer, "config", None), "num_attention_heads", None)
        if isinstance(heads, int) and heads % state.ulysses:
            raise ValueError(f"parallel.ulysses={state.ulysses} splits the attention heads, but {name} has {heads}; "
                             f"use a Ulysses degree that divides {heads} (or parallel.ring)")

    @classmethod
    def contract(cls, args) -> Contract:
        base = super().contract(args)
        cond = list(args.get("conditioning", ["prompt_embeds"]))
        negatives = [f"negative_{c}" for c in cond]
        return Contract(reads=base.reads | frozenset(cond), writes=base.writes,
                        optional_reads=frozenset(negatives) | {"generator", "latents_noised"}, callbacks=base.callbacks,
                        modules=base.modules)

    def required_reads(self) -> tuple[str, ...]:
        return tuple(self.reads) + tuple(self.conditioning)

    @staticmethod
    def default_timestep_input(t, req, settings):
        return t.expand(req.latents.shape[0]).to(req.latents.dtype)

    @staticmethod
    def default_latent_input(latents, req, settings):
        return latents

    @staticmethod
    def default_combine_cfg(cond, uncond, scale):
        return uncond + scale * (cond - uncond)

    @staticmethod
    def default_postprocess_prediction(pred, req, settings):
        return pred

    @staticmethod
    def default_step_kwargs(req, settings, scheduler):
        accepted = inspect.signature(scheduler.step).parameters
        kwargs = {}
        if "generator" in accepted:
            kwargs["generator"] = req.generator
        if "eta" in accepted:
            kwargs["eta"] = settings.get("eta", 0.0)
        return kwargs

    def seed_list_problem(self) -> str | None:
        """Why a request may not give one seed per prompt here (None: it may)."""
        return seed_list_problem(self.scheduler, self.settings)

    def add_step_hook(self, hook: StepHook) -> None:
        self.step_hooks.append(hook)

    def predict(self, latents, timestep, inputs: dict, cache: StepCache | None = None) -> torch.Tensor:
        kwargs = {self.latents_arg: latents, self.timestep_arg: timestep, **inputs}
        if cache is not None and self.cache_route == "argument":  # this run's cache, with the call: the
            kwargs["step_cache"] = cache  # transformer is shared (declared blocks read it from a context variable)
        with cached_blocks(self.transformer, cache if self.cache_route == "blocks" else None):
            return self._call_transformer(kwargs)

    def _call_transformer(self, kwargs: dict) -> torch.Tensor:
        state = current()
        if state.sequence == 1:
            with routed_attention(self.transformer, self.attention_backend):
                return self.transformer(**kwargs, return_dict=False)[0]
        if not hasattr(self.transformer, "sequence_parallel_plan"):  # stock: hooks split and gather by its plan
            with split_sequence(self.transformer, state), \
                    routed_attention(self.transformer, self.attention_backend, state):
                return self.transformer(**kwargs, return_dict=False)[0]
        # each rank runs the model on its share of the sequence; attention runs across the ranks
        kwargs, _ = shard_inputs(kwargs, self.transformer.sequence_parallel_plan, state)
        with sequence_parallel(state):
            out = self.transformer(**kwargs, return_dict=False)[0]
        return gather_output(out, self.transformer.sequence_parallel_output, state)

    @staticmethod
    def cfg_parallel_predictions(pred: torch.Tensor, state) -> tuple[torch.Tensor, torch.Tensor]:
        """(cond, uncond) from the two CFG ranks, each of which computed one of them."""
        import torch.distributed as dist

        both = [torch.empty_like(pred) for _ in range(2)]
        dist.all_gather(both, pred.contiguous(), group=state.groups["cfg"])
        TRAFFIC["bytes"] += pred.numel() * pred.element_size()
        return both[0], both[1]

    @staticmethod
    def joined_inputs(cond: dict, uncond: dict, batch: int) -> dict | None:
        """Both branches' inputs as one batch (cond first), or None when they cannot be joined."""
        both = join_branches(cond, uncond, batch)
        return None if both is UNJOINABLE else both

    @torch.no_grad()
    def forward(self, req: Req) -> Req:
        model_inputs = self.callback("model_inputs")
        cond_inputs = model_inputs(req, self.settings, self.transformer, False)
        uncond_inputs = model_inputs(req, self.settings, self.transformer, True) if req.do_cfg else None
        step_kwargs = self.callback("step_kwargs")(req, self.settings, self.scheduler)
        if hasattr(self.scheduler, "set_begin_index"):  # where req.timesteps start in the scheduler's (a strength
            # keeps only the schedule's end: TimestepPreparationStage's strength_field)
            self.scheduler.set_begin_index(max(len(self.scheduler.timesteps) - len(req.timesteps), 0))
        batch = req.latents.shape[0]
        state = current()
        cfg_parallel = state.cfg > 1 and uncond_inputs is not None  # a rank per branch
        joined = self.joined_inputs(cond_inputs, uncond_inputs, batch) \
            if uncond_inputs is not None and self.cfg_batch and not cfg_parallel else None

        latents = req.latents
        init_sigma = getattr(self.scheduler, "init_noise_sigma", 1.0)
        noised = req.latents_noised  # an input image noised to the first step (ImageNoisingStage)
        # Euler, DPM: pure noise starts at the top sigma
        if not noised and not (isinstance(init_sigma, (int, float)) and init_sigma == 1.0):
            latents = latents * init_sigma
        cache = self.step_cache.for_run(len(req.timesteps)) if self.step_cache is not None else None
        self.last_cache_stats = None
        try:
            latents = self._loop(req, latents, cond_inputs, uncond_inputs, joined, cfg_parallel, batch, step_kwargs,
                                 cache)
        finally:
            if cache is not None:
                self.last_cache_stats = cache.stats()
                cache.end()  # an idle pipeline holds no residuals (hundreds of MB at 1024x1024)
        req.latents = latents
        return req

    def _loop(self, req, latents, cond_inputs, uncond_inputs, joined, cfg_parallel, batch, step_kwargs,
              cache: StepCache | None):
        timestep_input = self.callback("timestep_input")
        latent_input = self.callback("latent_input")
        combine = self.callback("combine_cfg")
        postprocess = self.callback("postprocess_prediction")
        scale_input = getattr(self.scheduler, "scale_model_input", None) if self.scale_model_input else None
        state = current()
        branch = (lambda i, name: cache.at(i, name)) if cache is not None else (lambda i, name: None)
        # disable=None: no bar when stderr is not a terminal (logs, CI, subprocesses)
        bar = tqdm(req.timesteps, disable=None if self.progress else True, desc="denoising", leave=False)
        for i, t in enumerate(bar):
            req.latents = latents
            timestep = timestep_input(t, req, self.settings)
            model_input = latent_input(scale_input(latents, t) if scale_input is not None else latents,
                                       req, self.settings)
            if cfg_parallel:
                first = state.index("cfg") == 0
                branch(i, "cond" if first else "uncond")
                mine = cond_inputs if first else uncond_inputs
                cond, uncond = self.cfg_parallel_predictions(self.predict(model_input, timestep, mine, cache), state)
                noise_pred = combine(cond, uncond, req.cfg_scale)
            elif joined is not None:
                per_sample = isinstance(timestep, torch.Tensor) and timestep.dim() and timestep.shape[0] == batch
                both_t = torch.cat([timestep, timestep]) if per_sample else timestep
                branch(i, "both")
                cond, uncond = self.predict(torch.cat([model_input, model_input]), both_t, joined, cache).chunk(2)
                noise_pred = combine(cond, uncond, req.cfg_scale)
            else:
                branch(i, "cond")
                noise_pred = self.predict(model_input, timestep, cond_inputs, cache)
                if uncond_inputs is not None:
                    branch(i, "uncond")
                    uncond = self.predict(model_input, timestep, uncond_inputs, cache)
                    noise_pred = combine(noise_pred, uncond, req.cfg_scale)
            noise_pred = postprocess(noise_pred, req, self.settings)
            for hook in self.step_hooks:
                out = hook(self, req, i, t, noise_pred)
                if out is not None:
                    noise_pred = out
            latents = self.scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]
            check_finite_latents(latents, type(self).__name__, i + 1, len(req.timesteps), t)
            report_step(i + 1, len(req.timesteps), latents, req)  # progress, previews, cancellation
        return latents
