"""The report of a `diffstage generate -m ...` sweep: a labelled grid of every job's image and a table.

Hydra calls `SweepReport` (conf/config.yaml, hydra.callbacks) as each job starts and ends, in the process that runs
the job (this one, or a launcher's worker: joblib, SLURM through submitit, ...), and at the end of the sweep in
this one. Each job writes its row into the sweep directory (ROWS), so the report sees every job wherever it ran; a
job whose process died leaves the row it wrote when it started. A job that fails (a value out of range, a missing
file) is recorded with its error and the sweep goes on; the command then exits non-zero. The sweep directory ends
up with:

    sweep_grid.png   one cell per job, labelled with the overrides that vary between jobs
    sweep.jsonl      one JSON object per job: job, overrides, seed, images, seconds per stage, reused
                     stages, error (null when it worked)
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

GRID, TABLE = "sweep_grid.png", "sweep.jsonl"
ROWS = ".diffstage-sweep"  # in the sweep directory while the sweep runs: job-N.json per job, from its own process
SWEEP_JOBS_ENV = "DIFFSTAGE_SWEEP_JOBS"  # the sweep's job count, for the jobs a launcher runs in its own processes
UNFINISHED = "the job started but did not finish (its process ended before it could report)"
CELL = 192  # pixels: room for labels like "seed=1 true_cfg_scale=4.0"


class SweepState:
    """What the jobs of the sweep in progress reported (one sweep runs at a time in a process)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.active = False
        self.report: list[Path] = []  # the grid and the table, once written
        self.report_error: str | None = None  # what of the report could not be written, and why
        self.sweep_dir: Path | None = None

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r.get("error")]


STATE = SweepState()


def job_result(images: list[str] | None = None, seed: Any = None, timings: dict | None = None,
               reused: list[str] | None = None, error: str | None = None,
               reports: dict | None = None, score: dict | None = None) -> dict[str, Any]:
    """What a sweep job returns to the report (the task function's return value); `score` only with an objective
    (diffstage/objective.py)."""
    return {"seed": seed, "images": list(images or []), "timings": dict(timings or {}),
            "reused": list(reused or []), "reports": dict(reports or {}), "error": error,
            **({"score": score} if score is not None else {})}


def varying(rows: list[dict[str, Any]]) -> list[str]:
    """The override keys whose values differ between jobs, in the order they were given."""
    keys: list[str] = []
    for row in rows:
        for key in row["overrides"]:
            if key not in keys:
                keys.append(key)
    return [k for k in keys if len({r["overrides"].get(k) for r in rows}) > 1]


def write_table(sweep_dir: Path, rows: list[dict[str, Any]]) -> Path:
    """Write the table of `rows` into `sweep_dir`; returns its path."""
    from .output_files import write_new

    sweep_dir.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(row, default=str) + "\n" for row in rows)
    return write_new(sweep_dir / TABLE, lambda tmp: Path(tmp).write_text(text))


def write_grid(sweep_dir: Path, rows: list[dict[str, Any]]) -> Path:
    """Draw the grid of `rows` (a gray cell for a job without a readable PNG) into `sweep_dir`; returns its path."""
    from PIL import Image

    from .png import save_png
    from .sheet import contact_sheet

    keys = varying(rows)
    images, labels = [], []
    for row in rows:
        label = " ".join(f"{k.rsplit('.', 1)[-1]}={row['overrides'][k]}" for k in keys) or f"job {row['job']}"
        paths = [p for p in row["images"] if p.endswith(".png") and Path(p).is_file()]
        if paths:
            with Image.open(paths[0], formats=["PNG"]) as image:  # the jobs' own PNGs
                images.append(image.convert("RGB"))
        else:  # a failed job (or a video) keeps its cell, so the grid stays a grid
            images.append(Image.new("RGB", (CELL, CELL), (200, 200, 200)))
            label = f"{label} (failed)" if row.get("error") else label
        labels.append(label)
    last = keys[-1] if keys else None  # Hydra varies the last override fastest: one row per other combination
    columns = len({r["overrides"].get(last) for r in rows}) if last else min(len(rows), 10)
    grid = contact_sheet(images, labels, columns=columns, cell=CELL)
    meta = {"sweep": json.dumps([{"job": r["job"], "overrides": r["overrides"]} for r in rows])}
    return save_png(grid, sweep_dir / GRID, meta)


def _in_sweep(config) -> bool:
    from hydra.types import RunMode

    return config.hydra.mode == RunMode.MULTIRUN


def _write_row(config, result: dict[str, Any]) -> None:
    """Write job `config.hydra.job.num`'s row into the sweep directory (atomically: a reader sees all or none)."""
    from omegaconf import OmegaConf

    job = int(config.hydra.job.num)
    overrides = dict(o.split("=", 1) for o in OmegaConf.to_container(config.hydra.overrides.task) if "=" in o)
    folder = Path(config.hydra.sweep.dir) / ROWS
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".job-{job}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"job": job, "overrides": overrides, **result}, default=str))
    os.replace(tmp, folder / f"job-{job}.json")


def _row_files(sweep_dir: Path) -> list[Path]:
    rows = [p for p in (sweep_dir / ROWS).glob("job-*.json") if p.stem.split("-", 1)[1].isdigit()]
    return sorted(rows, key=lambda p: int(p.stem.split("-", 1)[1]))


def read_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    """The rows the jobs wrote, in job order (a file that cannot be read becomes a row with that error)."""
    rows = []
    for path in _row_files(sweep_dir):
        try:
            rows.append(json.loads(path.read_text()))
        except (OSError, ValueError) as e:
            rows.append({"job": int(path.stem.split("-", 1)[1]), "overrides": {},
                         **job_result(error=f"its row {path} cannot be read: {e}")})
    return rows


def _clear_rows(sweep_dir: Path) -> None:
    """Remove the rows of the jobs (an earlier sweep's, at the start; this one's, once its table is written)."""
    for path in _row_files(sweep_dir):
        path.unlink(missing_ok=True)
    try:
        (sweep_dir / ROWS).rmdir()
    except OSError:  # absent, or holds something that is not ours
        pass


class SweepReport(Callback):
    """Hydra callback: each job writes its row (as it starts, then its result); the report is written when the
    sweep ends."""

    def on_multirun_start(self, config, **kwargs: Any) -> None:
        _check_optimizing_sweep(config)
        STATE.rows, STATE.active, STATE.report = [], True, []
        STATE.sweep_dir = Path(config.hydra.sweep.dir)
        _clear_rows(STATE.sweep_dir)
        trials = config.hydra.sweeper.get("n_trials")
        if isinstance(trials, int):  # a sweeper that decides its jobs as it goes: the count is its setting
            os.environ[SWEEP_JOBS_ENV] = str(trials)  # (the command removes it when the sweep ends)

    def on_job_start(self, config, **kwargs: Any) -> None:
        if _in_sweep(config):
            _write_row(config, job_result(error=UNFINISHED))

    def on_job_end(self, config, job_return, **kwargs: Any) -> None:
        if not _in_sweep(config):
            return  # a single run: no report
        value = job_return._return_value  # the task returns its errors (cli/generate.py: _generate_task); others raised
        if isinstance(value, dict):
            result = value
        elif isinstance(value, BaseException):
            result = job_result(error=f"{type(value).__name__}: {value}")
        else:  # a task that reports nothing (diffstage sheet)
            result = job_result()
        if (config.get("objective") or {}).get("metric") is not None:  # an optimizing sweeper reads a number
            from .objective import objective_value

            job_return.return_value = objective_value(result.get("score"))
        try:
            _write_row(config, result)
        except OSError as e:  # the report will lack this job's result: say so where the job runs
            print(f"warning: cannot write this job's row into {Path(config.hydra.sweep.dir) / ROWS}: {e}",
                  file=sys.stderr, flush=True)

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        finish_report(Path(config.hydra.sweep.dir))


def _check_optimizing_sweep(config) -> None:
    """A sweeper that optimizes (Optuna, Nevergrad, Ax) reads a number from each job: objective.metric must say
    which; and under torchrun each rank's sampler would pick its own settings from its own timings."""
    from .cli.exits import fail
    from .distributed.state import launched_world
    from .errors import DiffstageError

    sweeper = config.hydra.sweeper
    if not any(key in sweeper for key in ("direction", "optim", "ax_config")):
        return
    if (config.get("objective") or {}).get("metric") is None:  # it would get a report row, not a number
        fail(DiffstageError("this sweeper minimizes a number that each job returns: set objective.metric=seconds "
                            "(and objective.psnr_min for a quality bound; README \"Tuning settings with Optuna\")"))
    if (launched_world() or (0, 1))[1] > 1:
        fail(DiffstageError("an optimizing sweeper cannot run under torchrun: each process would pick its own "
                            "settings from its own timings; run the sweep in one process (or on a launcher)"))


def finish_report(sweep_dir: Path, launcher_failed: bool = False) -> None:
    """Read the jobs' rows and write the report (once: also called when the launcher failed part way, and then
    the rows stay, as jobs still running may write theirs)."""
    from .distributed.state import launched_rank

    if not STATE.active:
        return
    STATE.active, STATE.report_error = False, None
    STATE.rows = read_rows(sweep_dir)
    if launched_rank() != 0:  # under torchrun, rank 0 writes the one report
        return
    if not STATE.rows:
        if not launcher_failed:
            STATE.report_error = (f"no job wrote its row into {sweep_dir.resolve() / ROWS} (jobs on other machines "
                                  "need hydra.sweep.dir on a file system every node shares)")
        return
    # Hydra turns an exception here into a warning: each failure is kept for the command to report (exit 2),
    # and the table is written first, so a grid that cannot be drawn loses nothing else.
    try:
        table = write_table(sweep_dir, STATE.rows).resolve()
    except Exception as e:  # noqa: BLE001
        STATE.report_error = f"cannot write {sweep_dir / TABLE}: {e}"
        return
    if not launcher_failed:
        _clear_rows(sweep_dir)
    try:
        STATE.report = [write_grid(sweep_dir, STATE.rows).resolve(), table]
    except Exception as e:  # noqa: BLE001
        STATE.report = [table]
        STATE.report_error = (f"cannot draw or write {sweep_dir.resolve() / GRID}: {type(e).__name__}: {e} "
                              f"(the table is in {table})")
    from .console import say
    from .errors import DiffstageError

    try:
        for path in STATE.report:
            say(path)
    except DiffstageError as e:
        STATE.report_error = "; ".join(filter(None, (STATE.report_error, str(e))))
