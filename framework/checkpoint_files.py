"""Which files of a checkpoint may be read: regular files inside the checkpoint, nothing else.

A downloaded checkpoint is untrusted input. Its shard index (`*.safetensors.index.json`) names
the weight files by path, so it could point at '../../secret' or '/etc/passwd'; a FIFO in place
of a weight file makes open() block forever. Both are refused before any loader reads them.
(Symlinks are followed: the Hugging Face cache links every file to a blob outside the folder.)"""
from __future__ import annotations

import json
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


def check_module_folder(folder: Path) -> None:
    """Refuse a module folder a loader could be tricked by: special files, escaping shard indexes."""
    for path in sorted(folder.rglob("*")):
        if not path.is_dir():
            require_regular_file(path)
    for index_file in sorted(folder.glob("*.index.json")):
        shard_files(index_file)
    if (folder / "config.json").is_file():
        check_config_sizes(folder / "config.json")


MAX_LAYERS = 1000  # far above any released model; a config asking for more would only hang the build
_LAYER_KEY = re.compile(r"(^|_)(layers|blocks|depth)$|^n_layer$")


def check_config_sizes(config_file: Path) -> None:
    """A config.json whose layer counts could not be real: refused before the model is built, since
    building (then failing strict loading) would take hours. Larger sizes fail strict loading quickly."""
    config = read_json_file(config_file)
    stack = [config]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                if isinstance(value, (dict, list)):
                    stack.append(value)
                elif isinstance(key, str) and _LAYER_KEY.search(key) and isinstance(value, (int, float)) \
                        and not isinstance(value, bool) and value > MAX_LAYERS:
                    raise LoadError(f"{config_file}: {key} is {shown(value)}; at most {MAX_LAYERS} layers are "
                                    "supported (is this config.json damaged?)")
        elif isinstance(node, list):
            stack.extend(v for v in node if isinstance(v, (dict, list)))
