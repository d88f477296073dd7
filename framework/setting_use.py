"""Settings a run was given but did not use.

Whether a setting matters is decided by the built pipeline, not by its name: `guidance_scale` is read by
a transformer with a guidance embedding (a callback passes it) and means nothing to a model that guides
with `true_cfg_scale`. So the run records which request fields its stages and callbacks read
(req.recording_reads), and a field set away from the model's default that nothing read is reported:
a sweep over it would otherwise give the same image for every value, silently."""
from __future__ import annotations

import warnings
from typing import Any

from .req import Req

# Request fields that are not sampling settings (the CLI sets them top-level or not at all).
NOT_SETTINGS = frozenset({"prompt", "seed", "input_latents", "output_type"})


class IgnoredSettingWarning(UserWarning):
    """A setting was given that nothing in the pipeline reads (Python shows each message once)."""


def model_defaults(spec) -> dict[str, Any]:
    """The request values the model YAML gives (its sampling defaults and declared fields' defaults)."""
    return {**spec.sampling.model_dump(), **{f.name: f.default for f in spec.field_specs()}}


def given_settings(req: Req, spec) -> dict[str, Any]:
    """The sampling settings of `req` that differ from the model's own defaults (what the caller chose)."""
    defaults = model_defaults(spec)
    standard = {f.name: f.default for f in type(req).__dataclass_fields__.values()}
    given = {}
    for name in sorted(type(req).request_fields() - NOT_SETTINGS):
        value = getattr(req, name)
        default = defaults.get(name) if defaults.get(name) is not None else standard.get(name)
        if value is not None and not _same(value, default):
            given[name] = value
    return given


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - a tensor or an image: not comparable, so taken as given
        return False


def ignored_settings(given: dict[str, Any], reads: set[str], spec, stages) -> dict[str, str]:
    """{name: message} for each given setting that no stage or callback read during the run."""
    out = {}
    for name in sorted(set(given) - reads):
        out[name] = f"sampling.{name} has no effect on model '{spec.name}': nothing in its pipeline reads it" + \
            _why(name, stages)
    return out


def _why(name: str, stages) -> str:
    """What the model uses instead, where a stage says (the CFG scale field it guides with)."""
    fields = {getattr(s, "cfg_scale_field", None) for s in stages} - {None, name}
    if name.endswith("cfg_scale") or name == "guidance_scale":
        if len(fields) == 1:
            return f" (its classifier-free guidance scale is {fields.pop()})"
    return ""


def warn_ignored(ignored: dict[str, str]) -> None:
    for message in ignored.values():
        warnings.warn(message, IgnoredSettingWarning, stacklevel=4)


def plain_cli_warnings() -> None:
    """On the command line these warnings read "warning: MESSAGE", without Python's file:line and source."""
    shown = warnings.formatwarning
    if getattr(shown, "_diffstage", False):
        return

    def format_warning(message, category, filename, lineno, line=None):
        if issubclass(category, IgnoredSettingWarning):
            return f"warning: {message}\n"
        return shown(message, category, filename, lineno, line)

    format_warning._diffstage = True
    warnings.formatwarning = format_warning
