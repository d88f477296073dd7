"""Overrides read before Hydra sees them (the command line, and build_pipeline's `overrides`).

Hydra refuses a key that is not in the composed config with "To append to your config use +KEY=...", which
is the wrong advice for a typo and a needless `+` for a request field a model declares. So, before Hydra:
- `sampling.NAME=...` for a NAME not in conf/config.yaml's `sampling` becomes `+sampling.NAME=...`: a model's
  own request fields (num_frames) are set like the standard ones; the model check (run_config.check_sampling_keys)
  still refuses a NAME the model does not declare, with a did-you-mean;
- any other key the run config does not know is refused here, with a did-you-mean;
- an argument that is no override at all (a bare prompt) gets the hint to write prompt="...".
Anything else (flags, `+`/`~` overrides, hydra.*, group paths) goes to Hydra unchanged."""
from __future__ import annotations

import functools
import io
from contextlib import redirect_stderr, redirect_stdout

from .errors import DiffstageError, shown
from .run_config import key_problems


@functools.lru_cache(maxsize=1)
def standard_sampling_keys() -> frozenset[str]:
    """The `sampling` keys conf/config.yaml declares (`diffstage sheet`'s config extends it)."""
    from importlib.resources import files

    import yaml

    config = yaml.safe_load((files("diffstage.conf") / "config.yaml").read_text())
    return frozenset(config.get("sampling") or ())


def prepare_overrides(overrides: list[str], sheet: bool = False) -> list[str]:
    """The overrides with model request fields given `+`; DiffstageError for unknown keys and bare words.
    `sheet`: they are for `diffstage sheet`'s config (which adds `prompts` and `seeds`)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType

    parser, out, problems = OverridesParser.create(), [], []
    for text in overrides:
        try:
            override = parser.parse_override(text)
        except Exception:  # noqa: BLE001 - not an override: Hydra says why, unless it is a bare word
            if "=" not in text:
                raise DiffstageError(_bare_word(text)) from None
            out.append(text)
            continue
        key = override.key_or_group
        if override.type != OverrideType.CHANGE or override.package is not None or "/" in key or \
                key.split(".")[0] == "hydra":
            out.append(text)
            continue
        parts = key.split(".")
        if parts[0] == "sampling" and len(parts) == 2 and parts[1] not in standard_sampling_keys():
            out.append("+" + text)  # checked against the model's request fields once the model is known
            continue
        problems += key_problems(parts, sheet)
        out.append(text)
    if problems:
        raise DiffstageError("invalid run config:\n" + "\n".join(f"  - {p}" for p in problems))
    return out


def _bare_word(text: str) -> str:
    example = f'prompt="{text}"' if '"' not in text and len(text) <= 200 else 'prompt="..."'
    return (f"{shown(text)} is not an override (KEY=VALUE); to set the prompt, write {example} (quoted as one "
            "argument)")


def prepare_argv(argv: list[str], sheet: bool = False) -> list[str]:
    """`prepare_overrides` on the overrides of a Hydra command line (its flags and their values untouched)."""
    from hydra._internal.utils import get_args_parser

    try:  # Hydra's own parser tells overrides from flags; --version or a bad flag: Hydra answers it itself
        with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
            args = get_args_parser().parse_args(argv)
    except SystemExit:
        return argv
    overrides = list(args.overrides or [])
    if not overrides:
        return argv
    prepared = iter(prepare_overrides(overrides, sheet))
    remaining = list(overrides)
    out = []
    for arg in argv:  # replace each override in place, in order (a flag value equal to one is rare and kept)
        if remaining and arg == remaining[0]:
            remaining.pop(0)
            out.append(next(prepared))
        else:
            out.append(arg)
    return out
