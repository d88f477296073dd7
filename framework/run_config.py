"""Check the composed run config (conf/config.yaml plus overrides) before it is used.

Hydra refuses a misspelt key unless it is added with `+`; `+sampling.foo=1` or
`allow_pickle=no` would otherwise be ignored or, worse, read as true. Every
problem is reported at once, naming the key."""
from __future__ import annotations

from typing import Any

from .errors import DiffstageError, shown
from .req import Req
from .spec import did_you_mean

TOP_LEVEL = ("model", "model_path", "prompt", "seed", "sampling", "runtime", "attention", "allowlist",
             "allow_pickle", "output", "hydra", "prompts", "seeds")  # prompts/seeds: `diffstage sheet`
RUNTIME = ("device", "dtype", "kernels", "compile", "matmul_dtype")
# Request fields a run config may set; prompt and seed are top-level, input_latents is Python-only.
SAMPLING = tuple(sorted(Req.request_fields() - {"prompt", "seed", "input_latents"}))


def _unknown(section: dict, known, prefix: str) -> list[str]:
    out = []
    for key in section:
        if key not in known:
            hint = did_you_mean(key, known)
            out.append(f"unknown key '{prefix}{key}'" + (f" ({hint})" if hint else f"; known: {', '.join(known)}"))
    return out


def run_config_problems(cfg: dict[str, Any]) -> list[str]:
    problems = _unknown(cfg, TOP_LEVEL, "")
    for name, known in (("sampling", SAMPLING), ("runtime", RUNTIME)):
        section = cfg.get(name)
        if section is None:
            continue
        if not isinstance(section, dict):
            problems.append(f"'{name}' must be a mapping, got {shown(section)}")
            continue
        problems += _unknown(section, known, f"{name}.")
    runtime = cfg.get("runtime") if isinstance(cfg.get("runtime"), dict) else {}
    for key, value in (("allow_pickle", cfg.get("allow_pickle", False)), ("runtime.compile", runtime.get("compile", False))):
        if not isinstance(value, bool):
            problems.append(f"{key} must be true or false, got {shown(value)} ({type(value).__name__})")
    allowlist = cfg.get("allowlist") or []
    if not isinstance(allowlist, list) or not all(isinstance(p, str) and p for p in allowlist):
        problems.append(f"allowlist must be a list of module prefixes (strings), got {shown(allowlist)}")
    for key in ("model", "model_path"):
        value = cfg.get(key)
        if value is not None and not isinstance(value, str):
            problems.append(f"{key} must be a string, got {shown(value)}")
    return problems


def check_run_config(cfg: dict[str, Any]) -> None:
    """Raise DiffstageError listing every problem of a resolved run config (a plain dict)."""
    problems = run_config_problems(cfg)
    if problems:
        raise DiffstageError("invalid run config:\n" + "\n".join(f"  - {p}" for p in problems))
