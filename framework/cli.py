"""The `diffstage` command.

    diffstage generate [HYDRA OVERRIDES...]   generate an image (a Hydra app: -m, --cfg job, ... work)
    diffstage sheet [HYDRA OVERRIDES...]      a labelled contact sheet of the model's example prompts
    diffstage validate NAME_OR_PATH          check a model YAML without loading weights
    diffstage graph NAME_OR_PATH             print its stage graph as Mermaid text (--png PATH: with Graphviz)
    diffstage schema                          print the JSON Schema of model YAMLs (for editors)
    diffstage models                          list the shipped model YAMLs

Errors in user input print a message and exit 2; set DIFFSTAGE_DEBUG=1 (or
pass --debug to validate) to see the traceback instead."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .console import say

USAGE = """usage: diffstage <command> [args]

commands:
  generate [overrides]   generate an image; Hydra overrides such as prompt="a red fox" seed=0
                         model=NAME_OR_YAML model_path=DIR sampling.num_inference_steps=4 (-m, --cfg job, --help)
  sheet [overrides]      a labelled contact sheet: one image per example prompt of the model (or
                         prompts=[...]) and seed (seeds=[0,1]); same overrides as generate
  validate NAME_OR_PATH  check a model YAML (schema + stage contracts) without loading weights
  graph NAME_OR_PATH     its stage graph: the Req fields flowing between stages, as Mermaid text
                         (--png PATH draws it with Graphviz: pip install graphviz, plus its dot program)
  schema                 the JSON Schema of model YAMLs, for editors (--output PATH writes it to a new file)
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


# --- generate / sheet (Hydra apps) ------------------------------------------------------
MAX_NAME_BYTES = 200  # leaves room for the "_1" / "-2" suffixes of extra images and taken names
VIDEO_TASKS = ("t2v", "i2v", "ti2v")


def _output_name(filename: str | None, video: bool = False) -> Path:
    from .errors import DiffstageError, shown

    suffix = ".mp4" if video else ".png"
    if filename is None:
        return Path("video.mp4" if video else "image.png")
    name = Path(str(filename))
    if name.name != str(filename) or name.suffix.lower() != suffix:
        raise DiffstageError(f"output.filename must be a file name ending in {suffix}"
                             f"{' (this model makes videos)' if video else ''} (it is written into the run "
                             f"directory; set hydra.run.dir to choose that), got {shown(filename)}")
    if len(name.name.encode()) > MAX_NAME_BYTES:  # checked before generating, not when saving
        raise DiffstageError(f"output.filename is {len(name.name.encode())} bytes long; at most {MAX_NAME_BYTES} "
                             "are allowed (file systems limit a name to 255)")
    return name


def _save(item, name: str, pipe, prompt: str, seed) -> Path:
    """Write one PNG (or, for a list of frames, one MP4) with provenance into the run directory and
    print its path."""
    import yaml
    from hydra.core.hydra_config import HydraConfig

    meta = {"prompt": prompt, "seed": str(seed), "model": pipe.spec.name,
            "config": yaml.safe_dump(pipe.config, sort_keys=False, allow_unicode=True)}
    wanted = Path(HydraConfig.get().runtime.output_dir) / name
    if isinstance(item, list):  # a video: its frames
        import numpy as np

        from .video import save_mp4

        path = save_mp4(np.stack([np.asarray(frame.convert("RGB")) for frame in item]), wanted, meta)
    else:
        from .png import save_png

        path = save_png(item, wanted, meta)
    if path != wanted:  # another run (or a folder) has that name: nothing is overwritten
        print(f"note: {wanted} exists; wrote {path.name} beside it", file=sys.stderr)
    say(path.resolve())
    return path.resolve()


def _cli_output_type(cfg) -> None:
    """The CLI writes PNGs (MP4s for videos), so it needs PIL output; other output types are for Python."""
    from .errors import DiffstageError

    output_type = (cfg.get("sampling") or {}).get("output_type")
    if output_type not in (None, "pil"):
        raise DiffstageError(f"sampling.output_type={output_type} cannot be saved by the command line, which "
                             "writes PNG images and MP4 videos (output_type=pil); use output_type np/pt/latent "
                             "from Python")


def _in_sweep() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.get().mode == RunMode.MULTIRUN


def _sweep_jobs() -> int | None:
    """How many jobs this `-m` sweep runs: the product of the sweeps on the command line (None when Hydra
    cannot tell without running it, e.g. glob())."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    jobs = 1
    try:
        for override in OverridesParser.create().parse_overrides([a for a in sys.argv[1:] if "=" in a and
                                                                   not a.startswith("-")]):
            if override.is_sweep_override():
                jobs *= sum(1 for _ in override.sweep_string_iterator())
    except Exception:  # noqa: BLE001 - a sweep Hydra expands later: count unknown
        return None
    return jobs


def _generate_task(cfg):
    """One image (or video). In a sweep (-m) a failing job is reported and returned to the sweep report
    instead of ending the sweep; the command exits non-zero once every job has run."""
    from .errors import DiffstageError
    from .sweep import job_result

    try:
        return _generate_one(cfg)
    except Exception as e:
        user_error = isinstance(e, DiffstageError)
        if not _in_sweep() and user_error:
            _fail(e)
        if not _in_sweep() or (_debug() and not user_error):  # a bug shows its traceback
            raise
        message = str(e) if user_error else f"{type(e).__name__}: {e}"
        print(f"error: {message}", file=sys.stderr, flush=True)
        return job_result(seed=cfg.get("seed"), error=message)  # the sweep goes on


def _generate_one(cfg):
    from .builder import build_from_config, check_model
    from .errors import DiffstageError
    from .run_config import plain_run_config
    from .sweep import job_result

    plain = plain_run_config(cfg)
    checked = check_model(plain["model"], plain.get("allowlist") or ())
    base = _output_name(plain["output"]["filename"], checked.spec.task.value in VIDEO_TASKS)
    _cli_output_type(cfg)
    request = {"prompt": cfg.prompt, "seed": cfg.seed}
    if plain.get("image") is not None:
        if "image" not in checked.req_cls.request_fields():
            raise DiffstageError(f"model '{checked.spec.name}' takes no input image (its YAML declares no "
                                 "`image` request field); drop image=...")
        request["image"] = plain["image"]
    # a sweep makes many images in this process (the modules, compiled or not, are shared by its jobs)
    pipe = build_from_config(cfg, request=request, checked=checked, planned_images=_sweep_jobs() if _in_sweep() else 1)
    out = pipe(**request)
    from .distributed import is_main_process

    _log_reports(out.reports)
    if not is_main_process():  # with torchrun, rank 0 writes the files and prints their paths
        return job_result([], out.req.seed, out.timings, out.reused, reports=out.reports)
    paths = []
    for i, item in enumerate(out.images):
        # a video from a pipeline whose YAML says image (the Diffusers fallback runs any pipeline) is still an MP4
        name = base.with_suffix(".mp4") if isinstance(item, list) and base.suffix == ".png" else base
        paths.append(_save(item, name.name if i == 0 else f"{name.stem}_{i}{name.suffix}", pipe, str(cfg.prompt),
                           out.req.seed))
    return job_result([str(p) for p in paths], out.req.seed, out.timings, out.reused, reports=out.reports)


def _log_reports(reports: dict) -> None:
    """One line per step cache: how many transformer calls it spared."""
    import logging

    for label, report in reports.items():
        stats = report.get("step_cache")
        if stats:
            total = stats["computed"] + stats["cached"]
            logging.getLogger("diffstage").info(
                "%s: step cache %s (threshold %g): %d of %d transformer calls taken from the cache", label,
                stats["kind"], stats["threshold"], stats["cached"], total)


def _sheet_entries(plain: dict, examples) -> list[tuple[str, str]]:
    """(label, prompt) pairs: `prompts=[...]` from the command line, else the model's examples."""
    from .errors import DiffstageError

    given = plain.get("prompts")
    chosen = ([given] if isinstance(given, str) else given) if given is not None else examples
    if not chosen:
        raise DiffstageError("prompts=[] is empty" if given is not None else
                             "this model's YAML has no `examples`; pass prompts=[...] (or add examples to the YAML)")
    if isinstance(chosen, dict):
        return [(str(k), str(v)) for k, v in chosen.items()]
    return [(str(p), str(p)) for p in chosen]


def _sheet_task(cfg):
    from .builder import build_from_config, check_model
    from .errors import DiffstageError, OutputError
    from .sheet import contact_sheet
    from .sweep import job_result

    from .run_config import plain_run_config

    try:
        plain = plain_run_config(cfg)
        base = _output_name(plain["output"]["filename"])
        _cli_output_type(cfg)
        checked = check_model(plain["model"], plain.get("allowlist") or ())
        if checked.spec.task.value in VIDEO_TASKS:
            raise DiffstageError(f"diffstage sheet lays out images; model '{checked.spec.name}' makes videos "
                                 "(use diffstage generate)")
        entries = _sheet_entries(plain, checked.spec.examples)
        seeds = plain.get("seeds") or [cfg.seed]
        pipe = build_from_config(cfg, request={"prompt": [p for _, p in entries], "seed": seeds[0]}, checked=checked,
                                 planned_images=len(entries) * len(seeds))
        images, labels = [], []
        for seed in seeds:
            for label, prompt in entries:
                out = pipe(prompt=prompt, seed=seed).images
                for k, image in enumerate(out):
                    images.append(image)
                    suffix = (f" s{seed}" if len(seeds) > 1 else "") + (f" #{k}" if len(out) > 1 else "")
                    labels.append(label + suffix)
    except DiffstageError as e:
        _fail(e)
        return
    from .distributed import is_main_process

    if not is_main_process():  # with torchrun, rank 0 writes the sheet and prints its path
        return job_result([], seeds)
    prompts, seed_text = "; ".join(p for _, p in entries), ",".join(map(str, seeds))
    try:
        sheet = contact_sheet(images, labels, columns=len(images) // len(seeds))
    except Exception as e:  # noqa: BLE001 - the images are made: keep them, then say what failed
        kept = [_save(image, f"{base.stem}_{i}{base.suffix}", pipe, prompts, seed_text)
                for i, image in enumerate(images)]
        _fail(OutputError(f"cannot draw the contact sheet: {type(e).__name__}: {e} (its {len(kept)} images are "
                          "saved one by one beside it)"))
        return
    try:
        path = _save(sheet, base.name, pipe, prompts, seed_text)
    except DiffstageError as e:
        _fail(e)
        return
    return job_result([str(path)], seeds)  # for the report of a sweep (-m)


def _hydra_app(task, config_name: str, argv: list[str], command: str) -> None:
    import hydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from .errors import DiffstageError, OutputError, shown
    from .overrides import prepare_argv
    from .setting_use import plain_cli_warnings

    plain_cli_warnings()

    if any(a == "--experimental-rerun" or a.startswith("--experimental-rerun=") for a in argv):
        # it unpickles the file it is given: pickle can run code, and nothing in diffstage needs it
        _fail(DiffstageError("--experimental-rerun is not supported: it loads a pickle file, which can run code; "
                             "rerun with the overrides in the run folder's .hydra/overrides.yaml instead"))
    started = []

    def job(cfg):
        started.append(True)
        return task(cfg)

    job.__module__, job.__name__ = task.__module__, task.__name__  # Hydra names the job from these
    app = hydra.main(version_base=None, config_path="pkg://diffstage.conf", config_name=config_name)(job)
    try:  # typos get a did-you-mean, a model's request fields their `+` (see overrides.py)
        argv = prepare_argv(argv, sheet=config_name == "sheet")
    except DiffstageError as e:
        _fail(e)
    sys.argv = [f"diffstage {command}"] + argv
    # Hydra prints a traceback for errors outside the task (a run directory it cannot create);
    # HYDRA_FULL_ERROR makes it raise them instead, so they get one clear line here.
    previous = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    from .sweep import STATE, TABLE

    STATE.rows, STATE.report, STATE.report_error = [], [], None
    try:
        app()
        problems = [f"the sweep report is incomplete: {STATE.report_error}"] if STATE.report_error else []
        if STATE.failed:  # a sweep ran every job; some failed (each said why when it ran)
            table = [p for p in STATE.report if p.name == TABLE]
            where = f" (see {table[0]})" if table else ""
            problems.append(f"{len(STATE.failed)} of {len(STATE.rows)} sweep jobs failed{where}: " + "; ".join(
                f"job {r['job']}: {' '.join(r['error'].split())}" for r in STATE.failed[:3]))
        if problems:
            _fail((OutputError if STATE.report_error else DiffstageError)("\n".join(problems)))
    except DiffstageError as e:
        _fail(e)
    except (HydraException, OmegaConfBaseException) as e:  # bad overrides, config composition
        cause = e.__cause__ if isinstance(e.__cause__, OmegaConfBaseException) else None
        _fail(DiffstageError("\n".join(str(x).strip().splitlines()[0] if x is cause else str(x).strip()
                                       for x in (e, cause) if x is not None)))
    except Exception as e:
        os_error = _os_error_in(e)
        if os_error is not None and (not started or e is os_error):  # the run directory: under a file, /sys, ...
            where = f"'{os_error.filename}'" if os_error.filename else "the run directory"
            _fail(OutputError(f"cannot create or write {where}: {os_error.strerror or os_error} (choose a writable "
                              "folder with hydra.run.dir=... or, with -m, hydra.sweep.dir=...)"))
        if started or not isinstance(e, (ValueError, TypeError)):
            raise
        # Hydra raises ValueError/TypeError for overrides it cannot use before the job starts
        # (`runtime=null`, an integer too long for Python to read, --shell-completion without a subcommand)
        _fail(DiffstageError(f"bad command line: {shown(str(e).splitlines()[0] if str(e) else type(e).__name__)}"))
    except SystemExit as e:  # Hydra reports usage errors with exit 1
        sys.exit(2 if e.code == 1 else e.code)
    finally:
        if previous is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = previous


def _os_error_in(error: BaseException) -> OSError | None:
    """The OSError behind an error (logging wraps the run directory's in a ValueError)."""
    seen = 0
    while error is not None and seen < 10:
        if isinstance(error, OSError):
            return error
        error, seen = error.__cause__ or error.__context__, seen + 1
    return None


def _rank_app(task, config_name: str, argv: list[str], command: str) -> None:
    """_hydra_app, except that under torchrun ranks other than 0 keep no run directory or log of their own
    (rank 0's is the run's): theirs is a scratch folder, removed when the command ends."""
    import shutil
    import tempfile

    from .distributed.state import launched_rank
    from .errors import DiffstageError

    try:
        rank = launched_rank()
    except DiffstageError as e:
        _fail(e)
    if rank == 0:
        return _hydra_app(task, config_name, argv, command)
    scratch = tempfile.mkdtemp(prefix="diffstage-rank-")
    try:
        _hydra_app(task, config_name, argv + [
            "hydra.output_subdir=null", f"hydra.run.dir={scratch}", f"hydra.sweep.dir={scratch}",
            "hydra.job_logging.root.level=ERROR", "hydra.hydra_logging.root.level=ERROR"], command)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _generate(argv: list[str]) -> None:
    _rank_app(_generate_task, "config", argv, "generate")


def _sheet(argv: list[str]) -> None:
    _rank_app(_sheet_task, "sheet", argv, "sheet")


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
    say(f"OK {checked.file}: model '{spec.name}' ({spec.pipeline_name}, {spec.task.value}), "
        f"{len(spec.stages)} stages, {len(spec.modules)} modules\n" + "".join(
            f"  stages[{p.index}] {p.cls.__name__}: reads {sorted(p.contract.reads)} -> writes "
            f"{sorted(p.contract.writes)}\n" for p in checked.plan), end="")


# --- graph / schema ------------------------------------------------------------------
def _graph(argv: list[str]) -> None:
    from .builder import check_model
    from .errors import DiffstageError
    from .graph import render_png, stage_graph, to_mermaid

    p = argparse.ArgumentParser(prog="diffstage graph", description="Print a model's stage graph (the Req fields "
                                "flowing between its stages) as Mermaid text, without loading weights.")
    p.add_argument("model", help="shipped model name or path to a model YAML")
    p.add_argument("--allow", action="append", default=[], metavar="PREFIX",
                   help="extra module prefix dotted paths may import from (repeatable)")
    p.add_argument("--png", metavar="PATH", help="draw it into a new PNG file instead (needs the graphviz "
                                                 "package and Graphviz's dot program)")
    args = p.parse_args(argv)
    try:
        graph = stage_graph(check_model(args.model, allowlist=args.allow))
        if args.png is None:
            say(to_mermaid(graph), end="")
            return
        path = _write_once(args.png, lambda: render_png(graph))
    except DiffstageError as e:
        _fail(e)
        return
    say(path.resolve())


def _schema(argv: list[str]) -> None:
    from .errors import DiffstageError
    from .schema import model_schema_json

    p = argparse.ArgumentParser(prog="diffstage schema", description="Print the JSON Schema (draft 2020-12) of "
                                "model YAMLs, for editors: `# yaml-language-server: $schema=PATH` in a YAML.")
    p.add_argument("--output", metavar="PATH", help="write it into a new file instead (an existing one is refused)")
    args = p.parse_args(argv)
    text = model_schema_json()
    if args.output is None:
        say(text, end="")
        return
    try:
        path = _write_once(args.output, text.encode)
    except DiffstageError as e:
        _fail(e)
        return
    say(path.resolve())


def _write_once(path: str, make) -> Path:
    """Write the bytes `make()` returns into the new file `path`, atomically; an existing file or folder of
    that name is refused, not replaced (outputs are never overwritten)."""
    from .output_files import write_new

    return write_new(path, lambda tmp: Path(tmp).write_bytes(make()), numbered=False)


def _models(argv: list[str]) -> None:
    from .model_yaml import describe_models

    p = argparse.ArgumentParser(prog="diffstage models", description="List the shipped model YAMLs.")
    p.parse_args(argv)
    rows = describe_models()
    width = max((len(n) for n, _, _ in rows), default=0)
    say("".join(f"{name.ljust(width)}  {task.ljust(4)}  {desc}\n" for name, task, desc in rows), end="")


COMMANDS = {"generate": _generate, "sheet": _sheet, "validate": _validate, "models": _models,
            "graph": _graph, "schema": _schema}


def main(argv: list[str] | None = None) -> None:
    from .console import guarded_stdout
    from .errors import DiffstageError

    try:
        with guarded_stdout():
            _dispatch(list(sys.argv[1:] if argv is None else argv))
    except DiffstageError as e:  # a report that could not be written to stdout (console)
        _fail(e)
    except BrokenPipeError:  # `diffstage models | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)


def _dispatch(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help", "help"):
        say(USAGE, end="")
        sys.exit(0 if argv else 2)
    if argv[0] == "--version":
        from . import __version__

        say(f"diffstage {__version__}")
        return
    command = COMMANDS.get(argv[0])
    if command is None:
        from .errors import did_you_mean

        hint = did_you_mean(argv[0], COMMANDS)
        print(f"error: unknown command '{argv[0]}'" + (f"; {hint}" if hint else "") + "\n\n" + USAGE,
              file=sys.stderr, end="")
        sys.exit(2)
    command(argv[1:])


if __name__ == "__main__":
    main()
