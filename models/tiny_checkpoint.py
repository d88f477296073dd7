"""Write a tiny random-weight checkpoint (for tests and benchmarks) atomically, once.

Every family's `tiny.py` builds a Diffusers pipeline object; this saves it in Diffusers
format in a sibling temp folder and moves it into place, the marker last, so a crash or a
concurrent builder never leaves a half-written checkpoint that looks complete. A folder
that already holds a checkpoint with the same marker is returned as it is."""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

import torch

MARKER = "tiny_checkpoint.json"


def is_complete(out_dir: pathlib.Path, marker: dict) -> bool:
    try:
        found = json.loads((out_dir / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return found == marker and (out_dir / "model_index.json").is_file()


def save_tiny_checkpoint(out_dir, marker: dict[str, Any], build: Callable[[], Any],
                         index_classes: dict[str, str] | None = None) -> pathlib.Path:
    """Save the pipeline `build()` returns to `out_dir` unless a checkpoint with `marker` is there.

    `index_classes` renames module classes in model_index.json (e.g. the tokenizer class the real
    repos name, which also resolves without sentencepiece)."""
    out_dir = pathlib.Path(out_dir)
    if is_complete(out_dir, marker):
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp creates 0700; give the final dir normal permissions
    try:
        with torch.random.fork_rng(devices=[]):  # don't disturb the caller's global RNG
            build().save_pretrained(tmp, safe_serialization=True)
        index = json.loads((tmp / "model_index.json").read_text())
        index.update({name: ["transformers", cls] for name, cls in (index_classes or {}).items()})
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        (tmp / MARKER).write_text(json.dumps(marker) + "\n")
        try:
            os.rename(tmp, out_dir)  # atomic when out_dir is absent (or an empty dir)
        except OSError:
            if is_complete(out_dir, marker):  # a concurrent builder won the race
                return out_dir
            # Existing, non-empty dir: invalidate it, then overwrite entry by entry, marker last.
            (out_dir / MARKER).unlink(missing_ok=True)
            for entry in sorted(tmp.iterdir(), key=lambda p: p.name == MARKER):
                dest = out_dir / entry.name
                if dest.is_dir():
                    shutil.rmtree(dest)
                os.replace(entry, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def tiny_cli(build: Callable[..., pathlib.Path], description: str, argv=None) -> None:
    """`python -m diffstage.models.<family>.tiny OUT_DIR [--seed N]`."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("out_dir", type=pathlib.Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(build(args.out_dir, seed=args.seed))
