"""Check the composed run config (conf/config.yaml plus overrides) before it is used, and type it.

Hydra refuses a misspelt key unless it is added with `+`; `+sampling.foo=1` or
`allow_pickle=no` would otherwise be ignored or, worse, read as true. Every
problem is reported at once, naming the key. The keys a run config may hold are
those of conf/ (read from its files: they are listed there once). `parse_run_config`
makes the checked, typed RunConfig that an entry point (the CLI, build_pipeline)
parses once and passes down."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any

import yaml

from .errors import DiffstageError, did_you_mean, shown
from .lora_files import lora_list_problems
from .objective import objective_problems
from .offload import offload_problems
from .quantize import quantize_problems
from .req import Req
from .reuse import DEFAULT_MAX_BYTES
from .step_cache import SETTINGS, settings_problems
from .vae_decode import decode_option_problems


@lru_cache(maxsize=1)
def conf_keys() -> dict[str, tuple[str, ...]]:
    """The keys of conf/: "" -> the top-level keys of `diffstage generate`'s config (its own, then its config
    groups), "sheet" -> those `diffstage sheet`'s and `diffstage serve`'s configs add, and each section -> its keys
    (a group's from the option it picks by default)."""
    conf = resources.files("diffstage.conf")
    config = yaml.safe_load(conf.joinpath("config.yaml").read_text(encoding="utf-8"))
    keys = {"": [k for k in config if k != "defaults"]}
    for entry in config["defaults"]:
        if isinstance(entry, dict):
            (group, option), = entry.items()
            keys[""].append(group)
            keys[group] = list(yaml.safe_load(conf.joinpath(group, f"{option}.yaml").read_text(encoding="utf-8")))
    keys.update({k: list(v) for k, v in config.items() if isinstance(v, dict) and k not in ("hydra", "sampling")})
    sheet = yaml.safe_load(conf.joinpath("sheet.yaml").read_text(encoding="utf-8"))
    keys["sheet"] = [k for k in sheet if k != "defaults" and k not in keys[""]]
    serve = yaml.safe_load(conf.joinpath("serve.yaml").read_text(encoding="utf-8"))
    keys["sheet"].append("serve")  # `diffstage serve`'s section, checked like the sheet's keys
    keys["serve"] = list(serve["serve"])
    return {k: tuple(v) for k, v in keys.items()}


def top_level(sheet: bool = True) -> tuple[str, ...]:
    """The top-level keys of `diffstage generate`'s config, plus (`sheet`) those `diffstage sheet`'s adds."""
    keys = conf_keys()
    return keys[""] + (keys["sheet"] if sheet else ())


def sections() -> dict[str, tuple[str, ...] | None]:
    """Section -> its keys; sampling: None (checked against the model's request fields); cache is checked as a
    whole (settings_problems)."""
    return {"sampling": None, **{k: v for k, v in conf_keys().items() if k not in ("", "sheet", "cache")}}

# Request fields a run config may not set under `sampling`: prompt and seed are top-level,
# input_latents is Python-only, loras is the top-level `lora`. The rest depends on the model (its YAML may declare more).
NOT_SAMPLING = {"prompt", "seed", "input_latents", "loras"}


def _unknown(section: dict, known, prefix: str, no_match: str | None = None) -> list[str]:
    """A problem per key of `section` not in `known`: with a did-you-mean, else `no_match` (default: the
    known keys)."""
    out = []
    for key in section:
        if key not in known:
            hint = did_you_mean(key, known)
            out.append(f"unknown key '{prefix}{key}'" + (f" ({hint})" if hint else
                                                         no_match or f"; known: {', '.join(known)}"))
    return out


def key_problems(key: list[str], sheet: bool = False) -> list[str]:
    """An unknown key of a command-line override (split at the dots), before Hydra composes anything;
    `sheet`: the override is for `diffstage sheet`, whose config adds prompts and seeds."""
    top = top_level(sheet)
    if key[0] not in top:
        return _unknown({key[0]: None}, top, "")
    known = SETTINGS if key[0] == "cache" else sections().get(key[0])  # cache: checked as a whole below
    return _unknown({key[1]: None}, known, f"{key[0]}.") if known is not None and len(key) == 2 else []


def run_config_problems(cfg: dict[str, Any]) -> list[str]:
    problems = _unknown(cfg, top_level(), "")
    for name, known in sections().items():
        section = cfg.get(name)
        if section is None:
            continue
        if not isinstance(section, dict):
            problems.append(f"'{name}' must be a mapping, got {shown(section)}")
            continue
        if known is not None:  # sampling keys are checked against the model's request fields
            problems += _unknown(section, known, f"{name}.")
    if isinstance(cfg.get("cache"), dict):
        problems += settings_problems(cfg["cache"], "cache")
    elif cfg.get("cache") is not None:
        problems.append(f"'cache' must be a mapping (cache=none|first_block|teacache), got {shown(cfg['cache'])}")
    runtime = cfg.get("runtime") if isinstance(cfg.get("runtime"), dict) else {}
    reuse = cfg.get("reuse") if isinstance(cfg.get("reuse"), dict) else {}
    for key, value in (("allow_pickle", cfg.get("allow_pickle", False)), ("runtime.compile", runtime.get("compile", False)),
                       ("reuse.enabled", reuse.get("enabled", True))):
        if not isinstance(value, bool) and not (key == "runtime.compile" and value == "auto"):
            also = " (or auto)" if key == "runtime.compile" else ""
            problems.append(f"{key} must be true or false{also}, got {shown(value)} ({type(value).__name__})")
    problems += decode_option_problems(runtime)
    problems += lora_list_problems(cfg.get("lora"), "lora")
    problems += quantize_problems(runtime)
    problems += offload_problems(runtime)
    problems += objective_problems(cfg.get("objective"))
    max_mb = reuse.get("max_mb", 0)
    if isinstance(max_mb, bool) or not isinstance(max_mb, (int, float)) or not 0 <= max_mb <= 2 ** 40:
        problems.append(f"reuse.max_mb must be a number of megabytes in [0, 2**40], got {shown(max_mb)}")
    allowlist = cfg.get("allowlist") or []
    if not isinstance(allowlist, list) or not all(isinstance(p, str) and p for p in allowlist):
        problems.append(f"allowlist must be a list of module prefixes (strings), got {shown(allowlist)}")
    if cfg.get("model") is None:
        problems.append("model is not set: give a shipped model name (see `diffstage models`) or a model YAML path")
    for key in ("model", "model_path", "image"):
        value = cfg.get(key)
        if value is not None and not isinstance(value, str):
            problems.append(f"{key} must be a string, got {shown(value)}")
    for section, key in (("runtime", "device"), ("runtime", "dtype"), ("runtime", "kernels"),
                         ("runtime", "matmul_dtype"), ("attention", "backend")):
        value = (cfg.get(section) if isinstance(cfg.get(section), dict) else {}).get(key)
        if value is not None and not isinstance(value, str):
            problems.append(f"{section}.{key} must be a string, got {shown(value)}")
    output = cfg.get("output")
    if "output" in cfg and (not isinstance(output, dict) or not isinstance(output.get("filename"), (str, type(None)))):
        problems.append("output.filename must be a file name such as image.png (or null for the default)")
    return problems + _sheet_problems(cfg)


def _sheet_problems(cfg: dict[str, Any]) -> list[str]:
    """`diffstage sheet`: prompts is a prompt, a list of prompts or a mapping label: prompt; seeds a list."""
    problems = []
    prompts = cfg.get("prompts")
    texts = [*prompts, *prompts.values()] if isinstance(prompts, dict) else prompts  # labels and prompts
    if prompts is not None and not isinstance(prompts, str) and (
            not isinstance(texts, list) or not all(isinstance(t, str) for t in texts)):
        problems.append(f"prompts must be a list of prompts (strings) or a mapping label: prompt, got {shown(prompts)}")
    seeds = cfg.get("seeds")
    if seeds is not None and (not isinstance(seeds, list) or not seeds
                              or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        problems.append(f"seeds must be a non-empty list of integers such as seeds=[0,1], got {shown(seeds)}")
    return problems


def plain_run_config(cfg: Any) -> dict[str, Any]:
    """The run config (a DictConfig or dict) as a checked plain dict, interpolations resolved."""
    from omegaconf import DictConfig, OmegaConf

    if not isinstance(cfg, DictConfig):
        if not isinstance(cfg, dict):
            raise DiffstageError(f"the run config must be a mapping, got {shown(cfg)}")
        cfg = OmegaConf.create(cfg)
    try:
        plain = OmegaConf.to_container(cfg, resolve=True)
    except Exception as e:  # an interpolation that does not resolve
        raise DiffstageError(f"invalid run config: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    check_run_config(plain)
    return plain


def check_sampling_keys(sampling: dict[str, Any], req_cls: type[Req], model_file: str) -> None:
    """`sampling.KEY` must be a request field of this model (standard, or declared in its YAML)."""
    known = sorted(req_cls.request_fields() - NOT_SAMPLING)
    problems = _unknown(sampling, known, "sampling.",
                        no_match=f"; known: {', '.join(known)} (no stage or callback of this model reads it)")
    if problems:
        raise DiffstageError(f"invalid run config for the model in {model_file}:\n"
                             + "\n".join(f"  - {p}" for p in problems))


def check_run_config(cfg: dict[str, Any]) -> None:
    """Raise DiffstageError listing every problem of a resolved run config (a plain dict)."""
    problems = run_config_problems(cfg)
    if problems:
        raise DiffstageError("invalid run config:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass(frozen=True)
class RunConfig:
    """A checked run config, typed: what one run (or build) was asked for. Sections are plain mappings."""

    model: str
    model_path: str | None = None
    prompt: Any = None
    seed: Any = None
    image: str | None = None
    sampling: dict[str, Any] = field(default_factory=dict)  # request defaults; None values keep the model's
    runtime: dict[str, Any] = field(default_factory=dict)  # device, dtype, kernels, compile, matmul_dtype
    attention_backend: str | None = None
    allowlist: tuple[str, ...] = ()
    allow_pickle: bool = False
    output_filename: str | None = None
    reuse_enabled: bool = True
    reuse_max_bytes: int = DEFAULT_MAX_BYTES
    parallel: dict[str, Any] = field(default_factory=dict)
    cache: dict[str, Any] | None = None  # step cache settings (conf/cache)
    prompts: Any = None  # `diffstage sheet` only
    seeds: list[int] | None = None  # `diffstage sheet` only
    plain: dict[str, Any] = field(default_factory=dict)  # the whole config less `hydra`, kept as provenance


def parse_run_config(cfg: Any) -> RunConfig:
    """The run config (a DictConfig or dict) checked (every problem at once) and typed; a RunConfig is
    returned as it is."""
    if isinstance(cfg, RunConfig):
        return cfg
    plain = plain_run_config(cfg)
    reuse = plain.get("reuse") or {}
    return RunConfig(
        model=plain["model"], model_path=plain.get("model_path"), prompt=plain.get("prompt"), seed=plain.get("seed"),
        image=plain.get("image"), sampling=dict(plain.get("sampling") or {}), runtime=dict(plain.get("runtime") or {}),
        attention_backend=(plain.get("attention") or {}).get("backend"), allowlist=tuple(plain.get("allowlist") or ()),
        allow_pickle=plain.get("allow_pickle", False), output_filename=(plain.get("output") or {}).get("filename"),
        reuse_enabled=reuse.get("enabled", True), reuse_max_bytes=int(reuse.get("max_mb", DEFAULT_MAX_BYTES // 2 ** 20) * 2 ** 20),
        parallel=dict(plain.get("parallel") or {}), cache=plain.get("cache"), prompts=plain.get("prompts"),
        seeds=plain.get("seeds"), plain={k: v for k, v in plain.items() if k != "hydra"})
