"""Which weight files of a component the loaders will read, and refusing any that would be unpickled.

diffstage loads weights with `use_safetensors=True`. Diffusers and Transformers then read fixed names
(`diffusion_pytorch_model.safetensors`, `model.safetensors`), or a safetensors shard index
(`*.safetensors.index.json`) and every file its `weight_map` names; Transformers also reads the file a
config.json names in `transformers_weights`, and, with PEFT installed, the adapter an `adapter_config.json`
announces (adapter_model.safetensors, else adapter_model.bin). Both pick the reader by suffix: `.safetensors` goes to the
safetensors library, anything else to `torch.load`, which unpickles. So the files those indexes and
that key name must all be safetensors files. Pickle indexes (`pytorch_model.bin.index.json`) beside them
are never read this way and are left alone. diffstage's native models read safetensors themselves."""
from __future__ import annotations

import re
import struct
from pathlib import Path

import torch

from .checkpoint_files import inside, read_json_object, shard_files
from .errors import LoadError, UnsafeCheckpointError, shown

SAFETENSORS = ".safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
MAX_HEADER_BYTES = 100 << 20  # the safetensors library's own limit on the JSON header
SAFE_TORCH = (2, 6)  # torch.load(weights_only=True) could be made to run code before 2.6 (CVE-2025-32434)

ADVICE = "convert it to safetensors, or set allow_pickle=true if you trust its source"


def named_weight_files(folder: Path) -> list[tuple[Path, str]]:
    """(file, what names it) for every weight file a safetensors index or `transformers_weights` names."""
    named: list[tuple[Path, str]] = []
    indexes = sorted(folder.glob(f"*{SAFETENSORS}.index.json"))
    config_file = folder / "config.json"
    explicit = read_json_object(config_file).get("transformers_weights") if config_file.is_file() else None
    if explicit is not None:
        target = inside(folder, explicit, config_file)
        if target.name.endswith(f"{SAFETENSORS}.index.json"):
            indexes.append(target)
        else:
            named.append((target, f"{config_file} names the weight file {shown(explicit)} (transformers_weights)"))
    for index in indexes:
        for file in shard_files(index):
            named.append((file, f"{index} names the weight file '{file.relative_to(index.parent)}'"))
    adapter = folder / "adapter_config.json"
    if adapter.is_file():  # PEFT reads adapter_model.safetensors, else adapter_model.bin with torch.load
        weights = folder / f"adapter_model{SAFETENSORS}"
        weights = weights if weights.is_file() else folder / "adapter_model.bin"
        named.append((weights, f"{adapter} makes Transformers (with PEFT installed) load the adapter weights "
                               f"'{weights.name}'"))
    return named


def check_pickle_free(module: str, files: list[Path], named: list[tuple[Path, str]]) -> None:
    """Refuse a component whose weights the loaders would read with torch.load (without allow_pickle).
    `files`: every file in the folder (a folder of pickle files alone is refused too, nested or not);
    `named`: named_weight_files of the folder."""
    for file, source in named:
        if not file.name.endswith(SAFETENSORS):
            raise UnsafeCheckpointError(f"module '{module}': {source}, which is not a safetensors file: loading it "
                                        f"would unpickle it, and pickle can run arbitrary code; {ADVICE}")
    if not any(p.suffix == SAFETENSORS for p in files):
        pickles = [p for p in files if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise UnsafeCheckpointError(f"module '{module}': {pickles[0]} is a pickle checkpoint, and loading pickle "
                                        f"can run arbitrary code; {ADVICE}")


def check_safetensors_headers(folder: Path, module: str, named: list[tuple[Path, str]]) -> None:
    """Every safetensors file the loaders may read (in `folder`, or `named` by its indexes) starts like one: an
    empty, truncated or pickle file under a safetensors name is named here rather than failing in a library."""
    files = {p for p in folder.glob(f"*{SAFETENSORS}") if p.is_file()}
    files |= {file for file, _ in named if file.name.endswith(SAFETENSORS)}
    for file in sorted(files):
        why = safetensors_header_problem(file)
        if why:
            raise LoadError(f"module '{module}': {file} is not a safetensors file ({why})")


def safetensors_header_problem(file: Path) -> str | None:
    """Why `file` cannot be safetensors (an 8-byte little-endian header length, then a JSON object), or None."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(9)
    except OSError as e:
        return f"cannot read it: {e.strerror or e}"
    if head.startswith(b"version "):  # a clone without git-lfs leaves text pointers in place of weights
        return "a Git LFS pointer, not the file: run `git lfs pull` in the checkpoint"
    if len(head) < 9:
        return f"{size} bytes, too short for a header: damaged, or another format under a safetensors name?"
    (length,) = struct.unpack("<Q", head[:8])
    if not 2 <= length <= min(size - 8, MAX_HEADER_BYTES):
        return f"its header length {length} does not fit its {size} bytes: damaged, or another format?"
    if head[8:9] != b"{":
        return "its header is not a JSON object: damaged, or another format?"
    return None


def require_safe_torch_load() -> None:
    """allow_pickle=true hands pickle files to torch.load(weights_only=True), whose guard older torch lacks."""
    match = re.match(r"(\d+)\.(\d+)", torch.__version__)
    if match is None or tuple(int(x) for x in match.groups()) < SAFE_TORCH:
        raise UnsafeCheckpointError(
            f"allow_pickle=true needs torch {SAFE_TORCH[0]}.{SAFE_TORCH[1]} or newer (installed: {torch.__version__}): "
            "older torch.load(weights_only=True) can be made to run code (CVE-2025-32434); upgrade torch, or "
            "convert the weights to safetensors and leave allow_pickle off")
