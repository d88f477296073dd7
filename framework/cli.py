"""The `diffstage` command.

    diffstage generate [HYDRA OVERRIDES...]   generate an image (a Hydra app: -m, --cfg job, ... work)
    diffstage validate NAME_OR_PATH          check a model YAML without loading weights
    diffstage models                          list the shipped model YAMLs

Errors in user input print a message and exit 2; set DIFFSTAGE_DEBUG=1 (or
pass --debug to validate) to see the traceback instead."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

USAGE = """usage: diffstage <command> [args]

commands:
  generate [overrides]   generate an image; Hydra overrides such as prompt="a red fox" seed=0
                         model=flux model_path=DIR sampling.num_inference_steps=4 (-m sweeps, --cfg job, --help)
  validate NAME_OR_PATH  check a model YAML (schema + stage contracts) without loading weights
  models                 list the shipped model YAMLs

Set DIFFSTAGE_DEBUG=1 to see tracebacks.
"""


def _debug() -> bool:
    return os.environ.get("DIFFSTAGE_DEBUG", "") not in ("", "0")


def _fail(err: Exception) -> None:
    if _debug():
        raise err
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)


# --- generate -------------------------------------------------------------------
def _output_name(filename: str) -> Path:
    from .errors import DiffstageError

    name = Path(str(filename))
    if name.name != str(filename) or name.suffix.lower() != ".png":
        raise DiffstageError(f"output.filename must be a file name ending in .png (it is written into the run "
                             f"directory; set hydra.run.dir to choose that), got '{filename}'")
    return name


def _generate_task(cfg) -> None:
    import yaml
    from hydra.core.hydra_config import HydraConfig

    from .builder import build_from_config
    from .errors import DiffstageError
    from .png import save_png

    try:
        base = _output_name(cfg.output.filename)
        request = {"prompt": cfg.prompt, "seed": cfg.seed}
        pipe = build_from_config(cfg, request=request)
        out = pipe(**request)
    except DiffstageError as e:
        _fail(e)
        return
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    meta = {"prompt": str(cfg.prompt), "seed": str(out.req.seed), "model": pipe.spec.name,
            "config": yaml.safe_dump(pipe.config, sort_keys=False, allow_unicode=True)}
    for i, image in enumerate(out.images):
        name = base.name if i == 0 else f"{base.stem}_{i}{base.suffix}"
        path = save_png(image, out_dir / name, meta)
        print(path.resolve(), flush=True)


def _generate(argv: list[str]) -> None:
    import hydra

    from .errors import DiffstageError

    app = hydra.main(version_base=None, config_path="pkg://diffstage.conf", config_name="config")(_generate_task)
    sys.argv = ["diffstage generate"] + argv
    try:
        app()
    except DiffstageError as e:
        _fail(e)
    except SystemExit as e:  # Hydra reports its own errors (bad overrides) with exit 1
        sys.exit(2 if e.code == 1 else e.code)


# --- validate / models -------------------------------------------------------------
def _validate(argv: list[str]) -> None:
    from .builder import check_model
    from .errors import DiffstageError

    p = argparse.ArgumentParser(prog="diffstage validate", description="Check a model YAML without loading weights.")
    p.add_argument("model", help="shipped model name or path to a model YAML")
    p.add_argument("--allow", action="append", default=[], metavar="PREFIX",
                   help="extra module prefix dotted paths may import from (repeatable)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)
    if args.debug:
        os.environ["DIFFSTAGE_DEBUG"] = "1"
    try:
        checked = check_model(args.model, allowlist=args.allow)
    except DiffstageError as e:
        _fail(e)
        return
    spec = checked.spec
    print(f"OK {checked.file}: model '{spec.name}' ({spec.pipeline_name}, {spec.task.value}), "
          f"{len(spec.stages)} stages, {len(spec.modules)} modules")
    for p in checked.plan:
        print(f"  stages[{p.index}] {p.cls.__name__}: reads {sorted(p.contract.reads)} -> writes {sorted(p.contract.writes)}")


def _models(argv: list[str]) -> None:
    from .models_dir import describe_models

    p = argparse.ArgumentParser(prog="diffstage models", description="List the shipped model YAMLs.")
    p.parse_args(argv)
    rows = describe_models()
    width = max((len(n) for n, _ in rows), default=0)
    for name, desc in rows:
        print(f"{name.ljust(width)}  {desc}")


COMMANDS = {"generate": _generate, "validate": _validate, "models": _models}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        sys.exit(0 if argv else 2)
    if argv[0] == "--version":
        from . import __version__

        print(f"diffstage {__version__}")
        return
    command = COMMANDS.get(argv[0])
    if command is None:
        from .spec import did_you_mean

        hint = did_you_mean(argv[0], COMMANDS)
        print(f"error: unknown command '{argv[0]}'" + (f"; {hint}" if hint else "") + "\n\n" + USAGE,
              file=sys.stderr, end="")
        sys.exit(2)
    command(argv[1:])


if __name__ == "__main__":
    main()
