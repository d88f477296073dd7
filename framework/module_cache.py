"""The loaded-module cache of a session: building the same model twice loads nothing the second time.

A module is kept under a key that says what it holds: where it was loaded from, its class, dtype, device
and runtime settings, and the identity and modification of every file in its folder (size, mtime, ctime,
inode, device). A checkpoint rewritten at the same path (a fine-tune step saving over it, in a notebook
or a server) therefore loads again, and whatever is keyed by the module's key (reused stage outputs)
changes with it. Hashing the weights would be exact but reads gigabytes per build; ctime, which no
program can set back, catches a rewrite that restores the old mtime."""
from __future__ import annotations

import dataclasses
import hashlib
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def folder_identity(folder: Path, files: Iterable[Path] | None = None) -> str:
    """A digest of the name, size, mtime, ctime, inode and device of every file under `folder` (symlinks
    followed, as the Hugging Face cache links files to blobs), or of `files` when the folder's checks
    already listed them. Call it after those checks."""
    rows = []
    listed = files if files is not None else (p for p in folder.rglob("*") if p.is_file())
    for path in sorted(listed):
        st = path.stat()
        rows.append((path.relative_to(folder).as_posix(), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino,
                     st.st_dev))
    return hashlib.sha1(repr(rows).encode()).hexdigest()


class ModuleCache:
    """Loaded modules by key (a frozen dataclass with a `files` field: see loader.ModuleKey)."""

    def __init__(self) -> None:
        self._modules: dict[Any, Any] = {}
        self._lock = threading.Lock()
        self.load_count = 0  # modules actually loaded from disk (the cache tests read it)

    def get(self, key: Any) -> Any | None:
        with self._lock:
            return self._modules.get(key)

    def put(self, key: Any, module: Any) -> None:
        """Keep `module`, dropping older versions of the same module (same key but for its files): a
        rewritten checkpoint replaces its old weights here (pipelines that hold them keep them alive)."""
        slot = dataclasses.replace(key, files="")
        with self._lock:
            for old in [k for k in self._modules if dataclasses.replace(k, files="") == slot]:
                del self._modules[old]
            self._modules[key] = module
            self.load_count += 1

    def forget(self, module: Any) -> None:
        """Stop handing out `module` (changed in place: fused LoRA adapters); later builds load their own."""
        with self._lock:
            for key in [k for k, m in self._modules.items() if m is module]:
                del self._modules[key]

    def clear(self) -> None:
        with self._lock:
            self._modules.clear()

    def __len__(self) -> int:
        return len(self._modules)
