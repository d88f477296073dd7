"""PipelineStage: the base class of every stage.

A stage declares, on the class, what it reads from the Req, what it writes, the
callbacks it calls and the modules it takes. The builder checks those
declarations across the whole pipeline before any weight loads; at run time
`__call__` wraps `forward` with the same checks (verify -> forward -> verify)."""
from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .errors import DiffstageError, RequestError, StageError, clipped
from .req import Req


@dataclass(frozen=True)
class CallbackSpec:
    """A hook a stage calls. `params` are the positional arguments it is called with."""

    name: str
    params: tuple[str, ...]
    required: bool = False
    doc: str = ""


@dataclass(frozen=True)
class Contract:
    """What one configured stage needs and provides; computed from its YAML args alone."""

    reads: frozenset[str]
    writes: frozenset[str]
    optional_reads: frozenset[str] = frozenset()
    optional_writes: frozenset[str] = frozenset()  # written only in some cases (e.g. negatives with CFG)
    callbacks: tuple[CallbackSpec, ...] = ()
    # argument path inside the stage's args -> name of the module it refers to
    modules: Mapping[tuple, str] = field(default_factory=dict)
    # state fields this stage introduces (not standard Req fields): name -> what it holds
    declares: Mapping[str, str] = field(default_factory=dict)


class Settings(dict):
    """Static model settings from `pipeline_config.settings`, readable as attributes."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"pipeline_config.settings has no '{name}'") from None


def _snake(name: str) -> str:
    name = re.sub(r"Stage$", "", name)
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


class PipelineStage:
    reads: ClassVar[tuple[str, ...]] = ()
    optional_reads: ClassVar[tuple[str, ...]] = ()
    writes: ClassVar[tuple[str, ...]] = ()
    optional_writes: ClassVar[tuple[str, ...]] = ()
    # new state fields (beyond the standard Req fields) the stage writes: name -> what it holds
    declares: ClassVar[Mapping[str, str]] = {}
    callback_specs: ClassVar[tuple[CallbackSpec, ...]] = ()
    # __init__ parameters that take a loaded module; the YAML value (default: the
    # parameter's own name) names an entry of `modules`.
    module_params: ClassVar[tuple[str, ...]] = ()
    # A stage that takes every loaded module (the Diffusers fallback): the builder passes them as
    # `modules` and the checkpoint's pipeline class as `pipeline_class`; a YAML may not set those.
    takes_all_modules: ClassVar[bool] = False
    # The contract the static check computed for this stage's YAML args (given to `bind` by the builder).
    declared: Contract | None = None
    # Its outputs depend only on its arguments, callbacks, modules and the fields it declares it reads
    # (no randomness, no module state): the pipeline may reuse them across calls (see reuse.py).
    reusable: ClassVar[bool] = False
    # The keyword arguments the stage was made with (recorded by __init__; see __init_subclass__).
    init_args: dict[str, Any] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # Record what each stage was made with (`init_args`), so that a stage instance handed to a
        # PipelineBuilder can be written back as YAML arguments.
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None or getattr(init, "_records_args", False):
            return

        @functools.wraps(init)
        def recording_init(self, *args: Any, **kw: Any) -> None:
            if "init_args" not in self.__dict__:  # the outermost __init__ (super().__init__ calls come later)
                try:
                    bound = inspect.signature(init).bind(self, *args, **kw)
                except TypeError:
                    bound = None  # init itself reports the bad call
                if bound is not None:
                    params = inspect.signature(init).parameters
                    recorded: dict[str, Any] = {}
                    for name, value in list(bound.arguments.items())[1:]:
                        if params[name].kind is inspect.Parameter.VAR_KEYWORD:
                            recorded.update(value)
                        elif params[name].kind is not inspect.Parameter.VAR_POSITIONAL:
                            recorded[name] = value
                    self.__dict__["init_args"] = recorded
            init(self, *args, **kw)

        recording_init._records_args = True
        cls.__init__ = recording_init

    def __init__(self) -> None:
        self.settings = Settings()
        self._callbacks: dict[str, Callable] = {}

    # --- declarations ---------------------------------------------------------
    @classmethod
    def default_name(cls) -> str:
        """The stage's name in a pipeline unless it is given one: its class name in snake case
        without "Stage" (TextEncodingStage -> text_encoding)."""
        return _snake(cls.__name__)

    @classmethod
    def callback_group(cls) -> str:
        """Key under `pipeline_config.callbacks` that holds this stage's callbacks: named after
        the class that declares them, so a subclass shares its parent's group."""
        owner = next((c for c in cls.__mro__ if "callback_specs" in vars(c)), cls)
        return _snake(owner.__name__)

    @classmethod
    def contract(cls, args: Mapping[str, Any]) -> Contract:
        """The stage's needs for these YAML args. Override when they depend on args."""
        modules = {}
        for p in cls.module_params:
            ref = args.get(p, p)
            if isinstance(ref, str):
                modules[(p,)] = ref
        return Contract(
            reads=frozenset(cls.reads),
            writes=frozenset(cls.writes),
            optional_reads=frozenset(cls.optional_reads),
            optional_writes=frozenset(cls.optional_writes),
            callbacks=tuple(cls.callback_specs),
            modules=modules,
            declares=dict(cls.declares),
        )

    # --- wiring (done by the builder) -------------------------------------------
    def bind(self, callbacks: Mapping[str, Callable], settings: Mapping[str, Any],
             sources: Mapping[str, str] | None = None, contract: Contract | None = None) -> None:
        """Wire the stage into a pipeline: its callbacks (missing ones fall back to its `default_<name>`),
        settings and, from the static check, its `contract` (kept as `declared`); `sources` (callback name ->
        dotted path in the YAML) is what errors call the callbacks."""
        self.settings = Settings(settings)
        known = {spec.name for spec in self.callback_specs}
        unknown = sorted(set(callbacks) - known)
        if unknown:
            raise DiffstageError(f"{type(self).__name__} takes no callback {', '.join(map(repr, unknown))}; "
                                 f"it takes: {', '.join(sorted(known)) or 'none'}")
        bound = {}
        for spec in self.callback_specs:
            fn = callbacks.get(spec.name) or getattr(self, f"default_{spec.name}", None)
            if fn is None and spec.required:
                raise DiffstageError(f"{type(self).__name__}: required callback '{spec.name}' is not set")
            source = (sources or {}).get(spec.name) or getattr(fn, "__qualname__", None)
            bound[spec.name] = fn if fn is None else _reported(fn, f"{self.callback_group()}.{spec.name}",
                                                              str(source), type(self).__name__)
        self._callbacks = bound
        if contract is not None:
            self.declared = contract

    def bound_callbacks(self) -> dict[str, Callable | None]:
        """Every callback the stage takes -> what is bound to it (its `default_<name>`, or None when an
        optional one has neither); empty before `bind`. A copy: rebinding goes through `bind`."""
        return dict(self._callbacks)

    def callback(self, name: str) -> Callable:
        try:
            return self._callbacks[name]
        except KeyError:
            raise DiffstageError(f"{type(self).__name__}: callback '{name}' is not bound; call "
                                 "stage.bind(callbacks, settings) first (the builder does this)") from None

    # --- running ----------------------------------------------------------------
    def required_reads(self) -> tuple[str, ...]:
        """Fields that must be set before forward (override when they depend on arguments)."""
        return self.reads

    def guaranteed_writes(self) -> tuple[str, ...]:
        """Fields forward always sets (override when they depend on arguments)."""
        return self.writes

    def complete_request(self, req: Req) -> None:
        """Fill request fields the caller left unset whose defaults follow from other request fields
        (the output size of an editing model follows its input image). Runs before the checks, in
        stage order, under the same terms as `request_problems` (default: nothing)."""

    def request_problems(self, req: Req) -> list[str]:
        """Problems with a request this stage can see before it runs (default: none). Stages without
        modules are asked before any weight loads; every stage is asked before each run."""
        return []

    def memory_estimate(self, req: Req) -> dict[str, int]:
        """Bytes this stage will allocate for `req`, by what for ({"latents": n, ...}); the pipeline
        refuses a request whose stages' estimates add up to more than is free (default: nothing)."""
        return {}

    def report(self) -> dict[str, Any] | None:
        """What this stage has to say about its last run beside the timings (DenoisingStage: the step
        cache's counts); collected into PipelineOutput.reports (default: nothing)."""
        return None

    def __call__(self, req: Req) -> Req:
        name = type(self).__name__
        for f in self.required_reads():
            if getattr(req, f) is None:
                raise RequestError(f"{name}: required field '{f}' is not set on the request")
        out = self.forward(req)
        if not isinstance(out, Req):
            raise TypeError(f"{name}.forward must return the Req, got {type(out).__name__}")
        missing = [f for f in self.guaranteed_writes() if getattr(out, f) is None]
        if missing:  # a stage bug: later stages would fail far from the cause
            raise RuntimeError(f"{name}.forward did not set {', '.join(missing)}, which it declares it writes")
        return out

    def forward(self, req: Req) -> Req:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _reported(fn: Callable, name: str, source: str, stage: str) -> Callable:
    """`fn`, raising a StageError that names the callback when it fails (the error is its cause)."""

    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DiffstageError:
            raise
        except Exception as e:
            raise StageError(f"{stage}: callback '{name}' ({clipped(source)}) failed: {type(e).__name__}: "
                             f"{clipped(str(e).strip(), 300)}") from e

    return call


def accepts_positional(fn: Callable, n: int) -> bool:
    """Whether `fn` can be called with n positional arguments."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return True  # builtins without signatures: give them the benefit of the doubt
    try:
        sig.bind(*([None] * n))
    except TypeError:
        return False
    return True
