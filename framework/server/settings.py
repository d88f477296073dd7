"""The `serve` section of `diffstage serve`'s config (conf/serve.yaml), checked and typed."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ..errors import DiffstageError, shown

API_KEY_ENV = "DIFFSTAGE_API_KEY"


@dataclass(frozen=True)
class ServeSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    models: tuple[tuple[str, str | None], ...] | None = None  # (model, model_path); None: the run config's model
    preload: bool = True
    max_batch: int = 8
    max_wait_ms: float = 10.0
    queue_size: int = 64
    request_timeout_s: float = 600.0
    url_ttl_s: float = 3600.0
    api_key: str | None = None
    memory_budget_gb: float | None = None
    video_fps: int = 16
    shutdown_grace_s: float = 30.0
    backend: str = "uvicorn"  # uvicorn: this process serves; ray: replicas behind Ray Serve's proxy (ray_backend.py)
    replicas: int | None = None  # serve.backend=ray: copies of the app (None: 1, or as autoscaling_config decides)
    ray: dict[str, Any] | None = None  # serve.backend=ray: Ray Serve deployment options (autoscaling_config, ...)
    ray_init: dict[str, Any] | None = None  # serve.backend=ray: ray.init() arguments (address, num_cpus, ...)


# key -> (kind, smallest allowed, largest allowed)
_NUMBERS = {"port": (int, 0, 65535), "max_batch": (int, 1, 4096), "max_wait_ms": (float, 0, 60_000),
            "queue_size": (int, 1, 1_000_000), "request_timeout_s": (float, 0.001, 7 * 86400),
            "url_ttl_s": (float, 1, 30 * 86400), "memory_budget_gb": (float, 0.001, 1e6),
            "video_fps": (int, 1, 240), "shutdown_grace_s": (float, 0, 3600), "replicas": (int, 1, 4096)}
BACKENDS = ("uvicorn", "ray")


def _number_problem(key: str, value: Any) -> str | None:
    kind, low, high = _NUMBERS[key]
    ok_type = isinstance(value, int) if kind is int else isinstance(value, (int, float))
    if ok_type and not isinstance(value, bool) and low <= value <= high:
        return None
    what = "an integer" if kind is int else "a number"
    return f"serve.{key} must be {what} in [{low:g}, {high:g}], got {shown(value)}"


def _model_entry(entry: Any) -> bool:
    if isinstance(entry, dict):
        return set(entry) <= {"model", "model_path"} and isinstance(entry.get("model"), str) and \
            isinstance(entry.get("model_path", ""), (str, type(None)))
    return isinstance(entry, str) and bool(entry)


def serve_settings(section: dict[str, Any] | None) -> ServeSettings:
    """ServeSettings from the config's `serve` section; DiffstageError listing every problem."""
    section = dict(section or {})
    problems = [p for key in _NUMBERS if section.get(key) is not None
                and (p := _number_problem(key, section[key])) is not None]
    models = section.get("models")
    if models is not None and (not isinstance(models, list) or not models or not all(map(_model_entry, models))):
        problems.append("serve.models must be a non-empty list of model names or YAML paths, each alone or as "
                        f"{{model: NAME_OR_YAML, model_path: DIR_OR_REPO_ID}}, got {shown(models)}")
    for key in ("host", "api_key"):
        if section.get(key) is not None and (not isinstance(section[key], str) or not section[key]):
            problems.append(f"serve.{key} must be a non-empty string, got {shown(section[key])}")
    if not isinstance(section.get("preload", True), bool):
        problems.append(f"serve.preload must be true or false, got {shown(section['preload'])}")
    problems += _backend_problems(section)
    if problems:
        raise DiffstageError("invalid serve settings:\n" + "\n".join(f"  - {p}" for p in problems))
    values = {k: v for k, v in section.items() if v is not None and k in ServeSettings.__dataclass_fields__}
    values.update({k: dict(section[k]) or None for k in ("ray", "ray_init") if section.get(k) is not None})
    if models is not None:
        values["models"] = tuple((m, None) if isinstance(m, str) else (m["model"], m.get("model_path"))
                                 for m in models)
    values["api_key"] = section.get("api_key") or os.environ.get(API_KEY_ENV) or None
    return ServeSettings(**values)


def _backend_problems(section: dict[str, Any]) -> list[str]:
    """serve.backend, and the Ray settings that only serve.backend=ray reads (set elsewhere they would be
    silently ignored)."""
    backend = section.get("backend", "uvicorn")
    if backend not in BACKENDS:
        return [f"serve.backend must be one of {', '.join(BACKENDS)}, got {shown(backend)}"]
    problems = []
    for key in ("ray", "ray_init"):
        value = section.get(key)
        if value is not None and (not isinstance(value, dict) or not all(isinstance(k, str) for k in value)):
            problems.append(f"serve.{key} must be a mapping of option names to values, got {shown(value)}")
    ray = section.get("ray") if isinstance(section.get("ray"), dict) else {}
    if "num_replicas" in ray:
        problems.append("serve.ray.num_replicas: set serve.replicas instead")
    if section.get("replicas") is not None and ray.get("autoscaling_config") is not None:
        problems.append("serve.replicas and serve.ray.autoscaling_config are exclusive (Ray Serve takes a fixed "
                        "number of replicas or an autoscaling range, not both): drop one")
    if backend != "ray":
        used = [f"serve.{k}" for k in ("replicas", "ray", "ray_init") if section.get(k)]
        if used:
            problems.append(f"{', '.join(used)} apply to serve.backend=ray only (serve.backend is {backend})")
    return problems
