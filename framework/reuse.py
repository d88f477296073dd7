"""Stage-output reuse: a stage whose inputs are the same as in an earlier call is not run again.

A stage's signature is built from what decides its outputs, ComfyUI-style: its class, the arguments it
was made with, the callbacks bound to it, the settings, the modules it uses (by where they were loaded
from) and the values of every Req field it declares it reads (its callbacks' @reads included). A sweep
over seeds or guidance then encodes each prompt once. Only stages that say they are deterministic in
those inputs (`reusable = True`: text and image encoding) take part, and not when a bound callback that
gets the request does not declare what it reads (it could depend on anything).

The cache is shared by the pipelines of one session (session.py: a sweep builds one pipeline per job; the
modules come from the session's module cache), holds stage outputs by reference (stages never change their
inputs in place) and evicts least recently used entries past the byte budget of the pipeline that stored
them. Keys identify what they stand for: classes and callbacks by the objects themselves (the key holds
them, so their ids cannot be recycled while it lives), modules by their loader key (files included), image
files and PIL images by content."""
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
MAX_HASHED_FILE_BYTES = 256 * 2 ** 20  # a longer file named by a string is not hashed: the stage runs


class Unhashable(Exception):
    """A value the signature cannot capture (a generator, an arbitrary object): the stage runs."""


def fingerprint(value: Any, modules: dict[int, str] | None = None, files: bool = True) -> Any:
    """A hashable stand-in for a Req value or stage argument: equal values give equal fingerprints. A loaded
    module (in `modules`: id -> where it was loaded from) stands for itself by where it came from. With
    `files`, a string naming a file stands for the file's bytes (an image path; stage arguments)."""
    if modules and id(value) in modules:
        return ("module", modules[id(value)])
    if value is None or isinstance(value, (bool, int, float, complex)):
        return (type(value).__name__, value)
    if isinstance(value, bytes):
        return ("bytes", hashlib.sha1(value).hexdigest())
    if isinstance(value, str):
        if files and len(value) < 4096 and os.path.isfile(value):  # an image path: its contents may change, mtime not
            return ("file", value, _file_digest(value))
        return ("str", value)
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(fingerprint(v, modules, files) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((str(k), fingerprint(v, modules, files)) for k, v in value.items())))
    if isinstance(value, torch.Tensor):
        flat = value.detach().cpu().contiguous().reshape(-1)
        raw = flat.view(torch.uint8) if flat.numel() else flat.to(torch.uint8)  # the bytes, whatever the dtype
        digest = hashlib.sha1(raw.numpy().tobytes()).hexdigest()
        return ("tensor", str(value.dtype), tuple(value.shape), str(value.device), digest)
    from PIL import Image

    if isinstance(value, Image.Image):
        # The pixels of a palette image are indices: the palette (and which index is transparent) decide
        # what they decode to.
        palette = (value.palette.mode, bytes(value.getpalette(None) or ())) if value.palette is not None else None
        return ("image", value.mode, value.size, hashlib.sha1(value.tobytes()).hexdigest(), palette,
                fingerprint(value.info.get("transparency")))
    raise Unhashable(type(value).__name__)


def _file_digest(path: str) -> str:
    """sha1 of a file's bytes (size and mtime miss a rewrite within the clock's step, or with utime)."""
    digest = hashlib.sha1()
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size > MAX_HASHED_FILE_BYTES:
                raise Unhashable(f"file over {MAX_HASHED_FILE_BYTES} bytes")
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    except OSError as e:  # unreadable: the stage runs and says so itself
        raise Unhashable(str(e)) from None
    return digest.hexdigest()


class _Same:
    """An object as a key part by identity, whatever its __eq__ (held, so its id cannot be recycled)."""

    __slots__ = ("obj",)

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, _Same) and other.obj is self.obj

    def __hash__(self) -> int:
        return id(self.obj)


def callback_identity(fn: Any, stage: Any = None) -> Any:
    """A callback as a key part: the function itself, so the key keeps it alive and a new function can
    never share its identity (an id() can be recycled once the function is freed). A method of another
    object than `stage` adds that object (two objects' methods share one function); the stage's own
    default_<name> methods do not, so that a key never holds a stage (and its modules) alive."""
    fn = inspect.unwrap(fn)  # the bound callback is wrapped for error reporting
    target = getattr(fn, "__func__", fn)
    try:
        hash(target)
    except TypeError:  # a callable object that defines __eq__ without __hash__
        raise Unhashable(type(target).__name__) from None
    owner = fn.__self__ if inspect.ismethod(fn) else None
    return target if owner is None or owner is stage else (target, _Same(owner))


def _undeclared_callbacks(stage) -> list[str]:
    """Bound callbacks that get the request but do not say what they read (not the stage's defaults)."""
    out = []
    for spec in stage.callback_specs:
        fn = stage.bound_callbacks().get(spec.name)
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


class ReuseCache:
    """Least recently used stage outputs. Each entry has the byte budget of the pipeline that stored it
    (`put`'s max_bytes, else the cache's `max_bytes`) and is dropped once it and the entries used after it
    take more than that budget: with one budget this is a plain LRU cache of that size, and a pipeline with
    a small budget (reuse.max_mb=0 stores nothing) never shortens what another pipeline's entries keep."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Any, tuple[dict[str, Any], int, int]] = OrderedDict()
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
            # Only image (and untyped) fields name files: a prompt that happens to be a path ('/proc/kmsg', a
            # 200 MB file) is its text, never read.
            paths = {s.name for s in type(req).extra_fields() if s.type in ("image", "any")}
            reads = {f: fingerprint(getattr(req, f), files=f in paths)
                     for f in sorted(contract.reads | contract.optional_reads)}
            settings = fingerprint(dict(stage.settings))
            callbacks = tuple((name, callback_identity(fn, stage)) for name, fn in sorted(stage.bound_callbacks().items())
                              if fn)
        except Unhashable:
            return None
        # The class object, not its name: a class redefined under the same name is another class.
        return (type(stage), args, callbacks, settings, tuple(reads.items()))

    def get(self, key: Any) -> dict[str, Any] | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry[0]

    def put(self, key: Any, outputs: dict[str, Any], max_bytes: int | None = None) -> None:
        budget = self.max_bytes if max_bytes is None else max_bytes
        size = _nbytes(outputs)
        with self._lock:
            if size > budget or key in self._entries:
                return
            self._entries[key] = (outputs, size, budget)
            self._bytes += size
            self._evict()

    def _evict(self) -> None:
        """Drop each entry that, with the entries used after it, exceeds its budget (the lock is held)."""
        newer = 0
        for key in reversed(list(self._entries)):
            _, size, budget = self._entries[key]
            if newer + size > budget:
                del self._entries[key]
                self._bytes -= size
            else:
                newer += size

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

