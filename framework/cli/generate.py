"""`diffstage generate` and `diffstage sheet`: the Hydra tasks that build the pipeline, run it and save what it
made (PNGs, MP4s for videos, a contact sheet) with provenance into the run directory."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import yaml

from ..build_plan import plan_build
from ..model_check import check_model
from ..job_score import reference_images, score
from ..objective import wants_score
from ..console import say
from ..distributed import is_main_process
from ..errors import DiffstageError, OutputError, shown
from ..png import save_png
from ..run_config import RunConfig, parse_run_config
from ..session import default_session
from ..sheet import contact_sheet
from ..sweep import job_result
from ..video import save_mp4
from .exits import debug, fail
from .hydra_app import HydraJob, rank_app, sweep_jobs

MAX_NAME_BYTES = 200  # leaves room for the "_1" / "-2" suffixes of extra images and taken names
VIDEO_TASKS = ("t2v", "i2v", "ti2v")


def generate_command(argv: list[str]) -> None:
    rank_app(_generate_task, "config", argv, "generate")


def sheet_command(argv: list[str]) -> None:
    rank_app(_sheet_task, "sheet", argv, "sheet")


def _output_name(filename: str | None, video: bool = False) -> Path:
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


def _save(item, folder: Path, name: str, pipe, prompt: str, seed) -> Path:
    """Write one PNG (or, for a list of frames, one MP4) with provenance into `folder` (the run directory) and
    print its path."""
    meta = {"prompt": prompt, "seed": str(seed), "model": pipe.spec.name,
            "config": yaml.safe_dump(pipe.config, sort_keys=False, allow_unicode=True)}
    if pipe.defaults.get("loras"):  # the adapters the command line ran with (path and scale of each)
        meta["lora"] = yaml.safe_dump(pipe.defaults["loras"], sort_keys=False, default_flow_style=True).strip()
    wanted = folder / name
    if isinstance(item, list):  # a video: its frames
        path = save_mp4(np.stack([np.asarray(frame.convert("RGB")) for frame in item]), wanted, meta)
    else:
        path = save_png(item, wanted, meta)
    if path != wanted:  # another run (or a folder) has that name: nothing is overwritten
        print(f"note: {wanted} exists; wrote {path.name} beside it", file=sys.stderr)
    say(path.resolve())
    return path.resolve()


def _cli_output_type(run: RunConfig) -> None:
    """The CLI writes PNGs (MP4s for videos), so it needs PIL output; other output types are for Python."""
    output_type = run.sampling.get("output_type")
    if output_type not in (None, "pil"):
        raise DiffstageError(f"sampling.output_type={output_type} cannot be saved by the command line, which "
                             "writes PNG images and MP4 videos (output_type=pil); use output_type np/pt/latent "
                             "from Python")


def _generate_task(cfg, job: HydraJob):
    """One image (or video). In a sweep (-m) a failing job is reported and returned to the sweep report
    instead of ending the sweep; the command exits non-zero once every job has run."""
    try:
        return _generate_one(cfg, job)
    except Exception as e:
        user_error = isinstance(e, DiffstageError)
        if not job.in_sweep and user_error:
            fail(e)
        if not job.in_sweep or (debug() and not user_error):  # a bug shows its traceback
            raise
        message = str(e) if user_error else f"{type(e).__name__}: {e}"
        print(f"error: {message}", file=sys.stderr, flush=True)
        return job_result(seed=cfg.get("seed"), error=message)  # the sweep goes on


def _generate_one(cfg, job: HydraJob):
    """The run config parsed, the model checked, the request built and checked, each once; then the weights."""
    run = parse_run_config(cfg)
    checked = check_model(run.model, run.allowlist)
    base = _output_name(run.output_filename, checked.spec.task.value in VIDEO_TASKS)
    _cli_output_type(run)
    fields = {"prompt": run.prompt, "seed": run.seed}
    if run.image is not None:
        if "image" not in checked.req_cls.request_fields():
            raise DiffstageError(f"model '{checked.spec.name}' takes no input image (its YAML declares no "
                                 "`image` request field); drop image=...")
        fields["image"] = run.image
    plan = plan_build(run, checked)
    req = plan.request(**fields)  # checked before any weight loads
    # a sweep makes many images in this process (the modules, compiled or not, are shared by its jobs)
    pipe = plan.load(default_session(), planned_images=sweep_jobs() if job.in_sweep else 1)
    reference = reference_images(run, checked, fields) if wants_score(run.plain) else None
    out = pipe.run(req)
    _log_reports(out.reports)
    scored = score(run, out, reference) if wants_score(run.plain) else None
    if not is_main_process():  # with torchrun, rank 0 writes the files and prints their paths
        return job_result([], out.req.seed, out.timings, out.reused, reports=out.reports, score=scored)
    paths = []
    for i, item in enumerate(out.images):
        # a video from a pipeline whose YAML says image (the Diffusers fallback runs any pipeline) is still an MP4
        name = base.with_suffix(".mp4") if isinstance(item, list) and base.suffix == ".png" else base
        paths.append(_save(item, job.output_dir, name.name if i == 0 else f"{name.stem}_{i}{name.suffix}", pipe,
                           str(run.prompt), out.req.seed))
    return job_result([str(p) for p in paths], out.req.seed, out.timings, out.reused, reports=out.reports,
                      score=scored)


def _log_reports(reports: dict) -> None:
    """One line per step cache: how many transformer calls it spared."""
    for label, report in reports.items():
        stats = report.get("step_cache")
        if stats:
            total = stats["computed"] + stats["cached"]
            logging.getLogger("diffstage").info(
                "%s: step cache %s (threshold %g): %d of %d transformer calls taken from the cache", label,
                stats["kind"], stats["threshold"], stats["cached"], total)


def _sheet_entries(run: RunConfig, examples) -> list[tuple[str, str]]:
    """(label, prompt) pairs: `prompts=[...]` from the command line, else the model's examples."""
    given = run.prompts
    chosen = ([given] if isinstance(given, str) else given) if given is not None else examples
    if not chosen:
        raise DiffstageError("prompts=[] is empty" if given is not None else
                             "this model's YAML has no `examples`; pass prompts=[...] (or add examples to the YAML)")
    if isinstance(chosen, dict):
        return [(str(k), str(v)) for k, v in chosen.items()]
    return [(str(p), str(p)) for p in chosen]


def _sheet_task(cfg, job: HydraJob):
    try:
        run = parse_run_config(cfg)
        base = _output_name(run.output_filename)
        _cli_output_type(run)
        checked = check_model(run.model, run.allowlist)
        if checked.spec.task.value in VIDEO_TASKS:
            raise DiffstageError(f"diffstage sheet lays out images; model '{checked.spec.name}' makes videos "
                                 "(use diffstage generate)")
        entries = _sheet_entries(run, checked.spec.examples)
        seeds = run.seeds or [run.seed]
        plan = plan_build(run, checked)
        plan.request(prompt=[p for _, p in entries], seed=seeds[0])  # every prompt, checked before weights load
        pipe = plan.load(default_session(), planned_images=len(entries) * len(seeds))
        images, labels = [], []
        for seed in seeds:
            for label, prompt in entries:
                out = pipe(prompt=prompt, seed=seed).images
                for k, image in enumerate(out):
                    images.append(image)
                    suffix = (f" s{seed}" if len(seeds) > 1 else "") + (f" #{k}" if len(out) > 1 else "")
                    labels.append(label + suffix)
    except DiffstageError as e:
        fail(e)
        return
    if not is_main_process():  # with torchrun, rank 0 writes the sheet and prints its path
        return job_result([], seeds)
    prompts, seed_text = "; ".join(p for _, p in entries), ",".join(map(str, seeds))
    try:
        sheet = contact_sheet(images, labels, columns=len(images) // len(seeds))
    except Exception as e:  # noqa: BLE001 - the images are made: keep them, then say what failed
        kept = [_save(image, job.output_dir, f"{base.stem}_{i}{base.suffix}", pipe, prompts, seed_text)
                for i, image in enumerate(images)]
        fail(OutputError(f"cannot draw the contact sheet: {type(e).__name__}: {e} (its {len(kept)} images are "
                          "saved one by one beside it)"))
        return
    try:
        path = _save(sheet, job.output_dir, base.name, pipe, prompts, seed_text)
    except DiffstageError as e:
        fail(e)
        return
    return job_result([str(path)], seeds)  # for the report of a sweep (-m)
