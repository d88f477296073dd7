"""Stage-output reuse: a stage whose inputs are the same as in an earlier call is not run again.

A stage's signature is built from what decides its outputs, ComfyUI-style: its class, the arguments it
was made with, the callbacks bound to it, the settings, the modules it uses (by where they were loaded
from) and the values of every Req field it declares it reads (its callbacks' @reads included). A sweep
over seeds or guidance then encodes each prompt once. Only stages that say they are deterministic in
those inputs (`reusable = True`: text and image encoding) take part, and not when a bound callback that
gets the request does not declare what it reads (it could depend on anything).

The cache is shared by the pipelines of one process (a sweep builds one per job; the modules come from
the loader's cache), holds stage outputs by reference (stages never change their inputs in place) and
evicts the least recently used entries past its byte budget."""
from __future__ import annotations

import hashlib
import inspect
import os
import threading
from collections import OrderedDict
from typing import Any

import torch

from .callbacks import READS

DEFAULT_MAX_BYTES = 512 * 2 ** 20


class Unhashable(Exception):
    """A value the signature cannot capture (a generator, an arbitrary object): the stage runs."""


def fingerprint(value: Any, modules: dict[int, str] | None = None) -> Any:
    """A hashable stand-in for a Req value or stage argument: equal values give equal fingerprints. A loaded
    module (in `modules`: id -> where it was loaded from) stands for itself by where it came from."""
    if modules and id(value) in modules:
        return ("module", modules[id(value)])
    if value is None or isinstance(value, (bool, int, float, complex)):
        return (type(value).__name__, value)
    if isinstance(value, str):
        if len(value) < 4096 and os.path.isfile(value):  # an image path: its contents may change
            stat = os.stat(value)
            return ("file", value, stat.st_size, stat.st_mtime_ns)
        return ("str", value)
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(fingerprint(v, modules) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((str(k), fingerprint(v, modules)) for k, v in value.items())))
    if isinstance(value, torch.Tensor):
        flat = value.detach().cpu().contiguous().reshape(-1)
        raw = flat.view(torch.uint8) if flat.numel() else flat.to(torch.uint8)  # the bytes, whatever the dtype
        digest = hashlib.sha1(raw.numpy().tobytes()).hexdigest()
        return ("tensor", str(value.dtype), tuple(value.shape), str(value.device), digest)
    from PIL import Image

    if isinstance(value, Image.Image):
        return ("image", value.mode, value.size, hashlib.sha1(value.tobytes()).hexdigest())
    raise Unhashable(type(value).__name__)


def _callback_identity(fn: Any) -> Any:
    fn = inspect.unwrap(fn)  # the bound callback is wrapped for error reporting
    target = getattr(fn, "__func__", fn)
    return (getattr(target, "__module__", None), getattr(target, "__qualname__", None), id(target))


def _undeclared_callbacks(stage) -> list[str]:
    """Bound callbacks that get the request but do not say what they read (not the stage's defaults)."""
    out = []
    for spec in stage.callback_specs:
        fn = stage._callbacks.get(spec.name)
        if fn is None or "req" not in spec.params:
            continue
        target = getattr(inspect.unwrap(fn), "__func__", inspect.unwrap(fn))
        default = getattr(type(stage), f"default_{spec.name}", None)
        if target is not getattr(default, "__func__", default) and not hasattr(target, READS):
            out.append(spec.name)
    return out


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    return 64


class StageCache:
    """Least recently used stage outputs, within `max_bytes`."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Any, tuple[dict[str, Any], int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def signature(self, stage, req, module_keys: dict[int, str]) -> Any | None:
        """The stage's signature for this request, or None when it must run (not reusable, or an input
        the signature cannot capture)."""
        contract = stage.declared
        if not getattr(stage, "reusable", False) or contract is None or _undeclared_callbacks(stage):
            return None
        try:
            args = fingerprint(stage.init_args, module_keys)
            reads = {f: fingerprint(getattr(req, f)) for f in sorted(contract.reads | contract.optional_reads)}
            settings = fingerprint(dict(stage.settings))
        except Unhashable:
            return None
        callbacks = tuple((name, _callback_identity(fn)) for name, fn in sorted(stage._callbacks.items()) if fn)
        return (f"{type(stage).__module__}.{type(stage).__qualname__}", args, callbacks, settings,
                tuple(reads.items()))

    def get(self, key: Any) -> dict[str, Any] | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry[0]

    def put(self, key: Any, outputs: dict[str, Any]) -> None:
        size = _nbytes(outputs)
        with self._lock:
            if size > self.max_bytes or key in self._entries:
                return
            self._entries[key] = (outputs, size)
            self._bytes += size
            self._evict()

    def resize(self, max_bytes: int) -> None:
        with self._lock:
            self.max_bytes = max_bytes
            self._evict()

    def _evict(self) -> None:
        """Drop the least recently used entries until the cache fits its budget (the lock is held)."""
        while self._entries and self._bytes > self.max_bytes:
            _, (_, dropped) = self._entries.popitem(last=False)
            self._bytes -= dropped

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)


SHARED = StageCache()  # the pipelines of one process share it (see build_from_config)
