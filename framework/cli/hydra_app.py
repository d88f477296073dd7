"""The Hydra plumbing of `diffstage generate` and `diffstage sheet`: the command line prepared for Hydra (typo
hints, `+` for request fields), the job named, HYDRA_FULL_ERROR set so errors outside the job get one clear line,
the sweep's failure summary, Hydra's errors turned into diffstage's, and the run directories of torchrun ranks."""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf.errors import OmegaConfBaseException

from ..distributed.state import launched_rank
from ..errors import DiffstageError, OutputError, shown
from ..overrides import prepare_argv
from ..setting_use import plain_cli_warnings
from ..environment import env_int
from ..sweep import STATE, SWEEP_JOBS_ENV, TABLE, finish_report
from .exits import debug, fail


@dataclass(frozen=True)
class HydraJob:
    """What Hydra decided for the job now running, read once when it starts and passed down."""
    output_dir: Path  # the run directory, where the job writes its files
    in_sweep: bool  # one job of a `-m` sweep


def _hydra_job() -> HydraJob:
    config = HydraConfig.get()
    return HydraJob(Path(config.runtime.output_dir), config.mode == RunMode.MULTIRUN)


def sweep_jobs() -> int | None:
    """How many jobs this `-m` sweep runs: the product of the sweeps on the command line (None when Hydra
    cannot tell without running it, e.g. glob()). A launcher's worker, and a sweeper that sets its count
    (Optuna's n_trials), read it from SWEEP_JOBS_ENV."""
    if env_int(SWEEP_JOBS_ENV, 0, 0):
        return env_int(SWEEP_JOBS_ENV, 0, 0)
    jobs = 1
    try:
        for override in OverridesParser.create().parse_overrides([a for a in sys.argv[1:] if "=" in a and
                                                                   not a.startswith("-")]):
            if override.is_sweep_override():
                jobs *= sum(1 for _ in override.sweep_string_iterator())
    except Exception:  # noqa: BLE001 - a sweep Hydra expands later: count unknown
        return None
    return jobs


def _hydra_app(task, config_name: str, argv: list[str], command: str) -> None:
    """Run `task(cfg, job)` as the Hydra app of `diffstage COMMAND`."""
    plain_cli_warnings()

    if any(a == "--experimental-rerun" or a.startswith("--experimental-rerun=") for a in argv):
        # it unpickles the file it is given: pickle can run code, and nothing in diffstage needs it
        fail(DiffstageError("--experimental-rerun is not supported: it loads a pickle file, which can run code; "
                             "rerun with the overrides in the run folder's .hydra/overrides.yaml instead"))
    started = []

    def job(cfg):
        started.append(True)
        return task(cfg, _hydra_job())

    # Without hydra.job.name (conf/config.yaml sets it) Hydra would name the job after these: kept as with cli.py
    job.__module__, job.__name__ = __package__, task.__name__
    app = hydra.main(version_base=None, config_path="pkg://diffstage.conf", config_name=config_name)(job)
    try:  # typos get a did-you-mean, a model's request fields their `+` (see overrides.py)
        argv = prepare_argv(argv, sheet=config_name in ("sheet", "serve"))
    except DiffstageError as e:
        fail(e)
    sys.argv = [f"diffstage {command}"] + argv
    STATE.rows, STATE.report, STATE.report_error, STATE.active = [], [], None, False
    with _full_hydra_errors(), _sweep_size_for_workers():
        try:
            app()
            _note_no_job_met_the_objective()
            failed = _sweep_failures()
            if failed is not None:
                fail(failed)
        except DiffstageError as e:
            fail(e)
        except (HydraException, OmegaConfBaseException) as e:  # bad overrides, config composition
            fail(_config_error(e))
        except Exception as e:
            in_sweep = STATE.active
            if in_sweep:  # the sweep stopped part way (a launcher's worker died): report the jobs that ran
                finish_report(STATE.sweep_dir, launcher_failed=True)
            error = _error_outside_job(e, started=bool(started))
            if error is None and in_sweep and not debug():
                error = _launcher_error(e)
            if error is None:
                raise
            fail(error)
        except SystemExit as e:  # Hydra reports usage errors with exit 1
            sys.exit(2 if e.code == 1 else e.code)


@contextmanager
def _full_hydra_errors() -> Iterator[None]:
    """Hydra prints a traceback for errors outside the task (a run directory it cannot create);
    HYDRA_FULL_ERROR makes it raise them instead, so they get one clear line here."""
    previous = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = previous


@contextmanager
def _sweep_size_for_workers() -> Iterator[None]:
    """The sweep's job count in the environment that a launcher's workers inherit (their argv is not ours)."""
    previous = os.environ.get(SWEEP_JOBS_ENV)
    jobs = sweep_jobs() if {"-m", "--multirun"} & set(sys.argv) else None
    if jobs is not None and previous is None:
        os.environ[SWEEP_JOBS_ENV] = str(jobs)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(SWEEP_JOBS_ENV, None)


def _sweep_failures() -> DiffstageError | None:
    """A sweep ran every job: what failed (each job said why when it ran) or the report it could not write."""
    problems = [f"the sweep report is incomplete: {STATE.report_error}"] if STATE.report_error else []
    if STATE.failed:
        table = [p for p in STATE.report if p.name == TABLE]
        where = f" (see {table[0]})" if table else ""
        problems.append(f"{len(STATE.failed)} of {len(STATE.rows)} sweep jobs failed{where}: " + "; ".join(
            f"job {r['job']}: {' '.join(r['error'].split())}" for r in STATE.failed[:3]))
    if not problems:
        return None
    return (OutputError if STATE.report_error else DiffstageError)("\n".join(problems))


def _note_no_job_met_the_objective() -> None:
    """An optimizing sweep in which no job met objective.psnr_min found no setting: say so."""
    scored = [row["score"] for row in STATE.rows if "score" in row]
    table = [str(p) for p in STATE.report if p.suffix == ".jsonl"]
    if scored and all(score.get("objective") is None for score in scored):
        print(f"note: no job of this sweep met objective.psnr_min (see the psnr of each in "
              f"{table[0] if table else 'its rows'}); the sweeper saw +inf for every one", file=sys.stderr)


def _launcher_error(e: Exception) -> DiffstageError:
    """The sweep's launcher raised (a worker process died, a cluster job failed): that, and the jobs' failures."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    failures = _sweep_failures()
    return DiffstageError(f"the sweep stopped: its launcher failed: {type(e).__name__}{': ' if first else ''}{first}"
                          + (f"\n{failures}" if failures else ""))


def _config_error(e: HydraException | OmegaConfBaseException) -> DiffstageError:
    """Hydra's or OmegaConf's error, with the first line of the OmegaConf error behind it."""
    cause = e.__cause__ if isinstance(e.__cause__, OmegaConfBaseException) else None
    return DiffstageError("\n".join(str(x).strip().splitlines()[0] if x is cause else str(x).strip()
                                    for x in (e, cause) if x is not None))


def _error_outside_job(e: Exception, started: bool) -> DiffstageError | None:
    """The user's error behind an exception the job did not handle, or None for a bug (shown with its traceback)."""
    os_error = _os_error_in(e)
    if os_error is not None and (not started or e is os_error):  # the run directory: under a file, /sys, ...
        where = f"'{os_error.filename}'" if os_error.filename else "the run directory"
        return OutputError(f"cannot create or write {where}: {os_error.strerror or os_error} (choose a writable "
                           "folder with hydra.run.dir=... or, with -m, hydra.sweep.dir=...)")
    if started or not isinstance(e, (ValueError, TypeError)):
        return None
    # Hydra raises ValueError/TypeError for overrides it cannot use before the job starts
    # (`runtime=null`, an integer too long for Python to read, --shell-completion without a subcommand)
    return DiffstageError(f"bad command line: {shown(str(e).splitlines()[0] if str(e) else type(e).__name__)}")


def _os_error_in(error: BaseException) -> OSError | None:
    """The OSError behind an error (logging wraps the run directory's in a ValueError)."""
    seen = 0
    while error is not None and seen < 10:
        if isinstance(error, OSError):
            return error
        error, seen = error.__cause__ or error.__context__, seen + 1
    return None


def rank_app(task, config_name: str, argv: list[str], command: str) -> None:
    """_hydra_app, except that under torchrun ranks other than 0 keep no run directory or log of their own
    (rank 0's is the run's): theirs is a scratch folder, removed when the command ends."""
    try:
        rank = launched_rank()
    except DiffstageError as e:
        fail(e)
    if rank == 0:
        return _hydra_app(task, config_name, argv, command)
    scratch = tempfile.mkdtemp(prefix="diffstage-rank-")
    try:
        _hydra_app(task, config_name, argv + [
            "hydra.output_subdir=null", f"hydra.run.dir={scratch}", f"hydra.sweep.dir={scratch}",
            "hydra.job_logging.root.level=ERROR", "hydra.hydra_logging.root.level=ERROR"], command)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
