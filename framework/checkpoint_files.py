"""Which files of a checkpoint may be read: regular files inside the checkpoint, nothing else.

A downloaded checkpoint is untrusted input. Its shard index (`*.safetensors.index.json`) names
the weight files by path, so it could point at '../../secret' or '/etc/passwd'; a FIFO in place
of a weight file makes open() block forever. Both are refused before any loader reads them.
A folder linked to '/' would be walked whole: folders are checked before they are walked, and a walk
stops at MAX_FOLDER_ENTRIES. (File links are followed: the Hugging Face cache links every file of a
snapshot to a blob outside it; folder links may not leave the checkpoint.)"""
from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path, PurePosixPath

from .errors import LoadError, clipped, shown

MAX_JSON_BYTES = 64 << 20  # config and index files are KB to a few MB


def require_regular_file(path: Path) -> None:
    try:
        mode = path.stat().st_mode
    except OSError as e:
        raise LoadError(f"cannot read {path}: {e.strerror or e}") from None
    if not stat.S_ISREG(mode):
        raise LoadError(f"{path} is not a regular file (a FIFO, device or folder where a checkpoint file should be)")


def read_json_file(path: Path) -> object:
    """A checkpoint JSON file (config, index): regular, of sane size, valid JSON."""
    require_regular_file(path)
    if path.stat().st_size > MAX_JSON_BYTES:
        raise LoadError(f"{path} is {path.stat().st_size:,} bytes; a checkpoint JSON file may be at most "
                        f"{MAX_JSON_BYTES:,}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:  # RecursionError: [[[[...]]]]
        raise LoadError(f"cannot read {path}: {type(e).__name__}: {clipped(str(e), 300)}") from None


def read_json_object(path: Path) -> dict:
    data = read_json_file(path)
    if not isinstance(data, dict):
        raise LoadError(f"{path} must hold a JSON object, got {type(data).__name__} {shown(data)}")
    return data


def inside(folder: Path, name: object, source: Path) -> Path:
    """`folder / name` for a file name read from `source`, refusing absolute and '..' paths."""
    if not isinstance(name, str) or not name:
        raise LoadError(f"{source} names a weight file {shown(name)}, which is not a file name")
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if PurePosixPath(name).is_absolute() or name.startswith(("/", "\\")) or ":" in name or ".." in parts:
        raise LoadError(f"{source} names the weight file {shown(name)}, which is outside the checkpoint folder; "
                        "refused (a shard index may only name files inside its own folder)")
    return folder.joinpath(*parts)


def shard_files(index_file: Path) -> list[Path]:
    """The weight files a shard index names: inside its folder, regular files."""
    index = read_json_object(index_file)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict):
        raise LoadError(f"{index_file} has no `weight_map` object")
    files = sorted({inside(index_file.parent, name, index_file) for name in weight_map.values()})
    for file in files:
        require_regular_file(file)
    return files


MAX_FOLDER_ENTRIES = 10_000  # files and folders in one component; released ones hold a few to a few hundred


def check_folder_link(folder: Path, root: Path) -> Path:
    """Refuse a folder that resolves outside the resolved checkpoint `root` (a link to '/', to a home
    folder...); returns where it resolves to."""
    target = folder.resolve()
    if not target.is_relative_to(root):
        raise LoadError(f"{folder} is a link to the folder '{target}', which is outside the checkpoint; refused "
                        "(files may link outside, as in the Hugging Face cache, but folders may not)")
    return target


def component_files(folder: Path, root: Path) -> list[Path]:
    """Every file in a component folder and the folders inside it. Each folder is checked by
    check_folder_link before it is walked, and the walk stops past MAX_FOLDER_ENTRIES entries."""
    files: list[Path] = []
    seen, pending, count, root = set(), [folder], 0, root.resolve()
    while pending:
        current = pending.pop()
        target = check_folder_link(current, root)
        if target in seen:  # a link back to a folder already walked
            continue
        seen.add(target)
        try:
            with os.scandir(current) as entries:
                for entry in entries:
                    count += 1
                    if count > MAX_FOLDER_ENTRIES:
                        raise LoadError(f"{folder} holds more than {MAX_FOLDER_ENTRIES:,} files and folders; a "
                                        "checkpoint component holds at most a few hundred (is model_path right?)")
                    path = Path(entry.path)
                    (pending if entry.is_dir() else files).append(path)  # is_dir follows links: checked above
        except OSError as e:
            raise LoadError(f"cannot read the folder {current}: {e.strerror or e}") from None
    return sorted(files)


def check_module_folder(folder: Path, root: Path | None = None) -> list[Path]:
    """Refuse a module folder a loader could be tricked by: folders linked out of the checkpoint `root`
    (default: the folder's parent), too many files, special files, escaping shard indexes, absurd
    config sizes. Returns the folder's files."""
    files = component_files(folder, root or folder.parent)
    for path in files:
        require_regular_file(path)
    for index_file in sorted(folder.glob("*.index.json")):
        shard_files(index_file)
    for name in ("config.json", "scheduler_config.json"):
        if (folder / name).is_file():
            check_config_sizes(folder / name)
    return files


MAX_LAYERS = 1000  # far above any released model; a config asking for more would only hang the build
_LAYER_KEY = re.compile(r"(^|_)(layers|blocks|depth)$|^n_layer$")
# Released schedulers train on 1000 timesteps; a scheduler builds tables this long when it is created,
# so 2e8 took a minute and gave a black image. 100x the usual leaves room for any real schedule.
MAX_TRAIN_TIMESTEPS = 100_000
_LIMITS = ((_LAYER_KEY, MAX_LAYERS, "layers"), (re.compile(r"^num_train_timesteps$"), MAX_TRAIN_TIMESTEPS, "timesteps"))


def check_config_sizes(config_file: Path) -> None:
    """A config whose layer or timestep counts could not be real: refused before the model is built, since
    building (then failing strict loading) would take hours. Larger sizes fail strict loading quickly."""
    config = read_json_file(config_file)
    stack = [config]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                if isinstance(value, (dict, list)):
                    stack.append(value)
                elif isinstance(key, str) and isinstance(value, (int, float)) and not isinstance(value, bool):
                    for pattern, limit, unit in _LIMITS:
                        if pattern.search(key) and value > limit:
                            raise LoadError(f"{config_file}: {key} is {shown(value)}; at most {limit} {unit} are "
                                            f"supported (is this {config_file.name} damaged?)")
        elif isinstance(node, list):
            stack.extend(v for v in node if isinstance(v, (dict, list)))
