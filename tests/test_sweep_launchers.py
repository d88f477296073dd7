"""`diffstage generate -m` through Hydra's launcher plugins (the `sweep` extra): the jobs run in the launcher's
worker processes, and the report (sweep_grid.png, sweep.jsonl) is the one the in-process sweep writes."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_cli import run

pytest.importorskip("hydra_plugins.hydra_joblib_launcher")

# 6 jobs, 3 of which fail their request check (height 33)
SWEEP = ("-m", "seed=1,2,3", "sampling.height=32,33", "sampling.num_inference_steps=2")
# The workers' torch may use other thread counts than one process does, so sums can round differently: images
# are compared within one level of 255.
PIXEL_TOLERANCE = 1
TESTS = Path(__file__).resolve().parent


def sweep(tmp_path_factory, name: str, *launcher: str) -> tuple[Path, object]:
    folder = tmp_path_factory.mktemp(name)
    result = run("generate", *SWEEP, *launcher, f"hydra.sweep.dir={folder}", cwd=folder)
    return folder, result


@pytest.fixture(scope="module")
def in_process(tmp_path_factory):
    folder, result = sweep(tmp_path_factory, "in_process")
    assert result.returncode == 2, result.stderr
    return folder


def report(folder: Path) -> tuple[list[dict], list[np.ndarray]]:
    """The table without what differs between runs (seconds, reused stages, where the sweep ran) and the images."""
    rows = [json.loads(line) for line in (folder / "sweep.jsonl").read_text().splitlines()]
    pixels = [np.asarray(Image.open(p), dtype=np.int16) for row in rows for p in row["images"]]
    kept = [{**{k: v for k, v in row.items() if k not in ("timings", "reused")},
             "images": [str(Path(p).relative_to(folder)) for p in row["images"]]} for row in rows]
    return kept, pixels


def assert_same_report(folder: Path, reference: Path) -> None:
    rows, pixels = report(folder)
    expected_rows, expected_pixels = report(reference)
    assert rows == expected_rows
    assert [row["error"] is not None for row in rows] == [False, True] * 3
    assert len(pixels) == 3 and all(np.abs(a - b).max() <= PIXEL_TOLERANCE for a, b in zip(pixels, expected_pixels))
    grid, expected = Image.open(folder / "sweep_grid.png"), Image.open(reference / "sweep_grid.png")
    assert grid.text["sweep"] == expected.text["sweep"] and grid.size == expected.size
    assert np.abs(np.asarray(grid, dtype=np.int16) - np.asarray(expected, dtype=np.int16)).max() <= PIXEL_TOLERANCE
    assert not (folder / ".diffstage-sweep").exists()  # the jobs' rows are gone once the table is written


def test_joblib_workers_give_the_in_process_report(in_process, tmp_path_factory):
    folder, result = sweep(tmp_path_factory, "joblib", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2")
    assert result.returncode == 2, result.stderr
    assert result.stdout.strip().splitlines()[-2:] == [str(folder / "sweep_grid.png"), str(folder / "sweep.jsonl")]
    assert "Joblib.Parallel(n_jobs=2" in result.stderr  # Hydra's log, on stderr: stdout has only paths
    assert all(line.startswith(str(folder)) for line in result.stdout.splitlines())
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"error: 3 of 6 sweep jobs failed (see {folder / 'sweep.jsonl'}): job 1: invalid request: - height must be")
    assert_same_report(folder, in_process)
    # three good jobs on two workers: a worker ran two, and reused the prompt's encoding of its first
    rows = [json.loads(line) for line in (folder / "sweep.jsonl").read_text().splitlines()]
    assert ["1:TextEncodingStage"] in [row["reused"] for row in rows]


def test_submitit_local_jobs_give_the_in_process_report(in_process, tmp_path_factory):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    folder, result = sweep(tmp_path_factory, "submitit", "hydra/launcher=submitit_local")
    assert result.returncode == 2, result.stderr
    assert result.stdout.strip().splitlines()[-2:] == [str(folder / "sweep_grid.png"), str(folder / "sweep.jsonl")]
    assert (folder / ".submitit").is_dir()  # each job ran as its own submitit job
    assert_same_report(folder, in_process)


def test_a_worker_that_dies_is_recorded_and_the_report_is_written(tmp_path):
    """A job whose process ends (a crash, the kernel's OOM killer) keeps the row it wrote when it started."""
    model = tmp_path / "digits_vanish.yaml"
    model.write_text("extends: digits\nname: digits_vanish\n"
                     f"model_path: {TESTS.parent / 'models' / 'digits' / 'checkpoint'}\n"
                     "pipeline_config:\n  callbacks:\n    latent_preparation:\n"
                     "      pack: fault_callbacks.pack_or_vanish\n")
    result = run("generate", "-m", f"model={model}", "allowlist=[fault_callbacks]",
                 "prompt=a handwritten digit one,vanish", "seed=1", "sampling.num_inference_steps=2",
                 "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={tmp_path / 'sweep'}",
                 cwd=tmp_path, env={"PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS),
                                                                                os.environ.get("PYTHONPATH")])),
                                    # joblib stops every worker once one dies: job 1 waits for job 0's report
                                    "DIFFSTAGE_TEST_VANISH_AFTER": str(tmp_path / "sweep")})
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    at = [i for i, line in enumerate(lines) if line.startswith("error: ")][-1]  # joblib may warn after it
    launcher, failed = lines[at:at + 2]
    assert launcher.startswith("error: the sweep stopped: its launcher failed: TerminatedWorkerError: ")  # joblib's
    assert failed == (f"1 of 2 sweep jobs failed (see {tmp_path / 'sweep' / 'sweep.jsonl'}): job 1: the job started "
                      "but did not finish (its process ended before it could report)")
    good, gone = [json.loads(line) for line in (tmp_path / "sweep" / "sweep.jsonl").read_text().splitlines()]
    assert good["error"] is None and Path(good["images"][0]).is_file()
    assert gone["overrides"]["prompt"] == "vanish" and gone["images"] == []
    assert (tmp_path / "sweep" / "sweep_grid.png").is_file()


def test_the_slurm_example_config_composes():
    """conf/hydra/launcher/slurm.yaml, the README's SLURM example, stays a valid submitit configuration."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    result = run("generate", "hydra/launcher=slurm", "hydra.launcher.partition=gpu", "--cfg", "hydra")
    assert result.returncode == 0, result.stderr
    launcher = result.stdout.split("\n  launcher:\n", 1)[1]
    assert "_target_: hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher" in launcher
    assert "    partition: gpu\n" in launcher and "    gpus_per_node: 1\n" in launcher
    assert "submitit_folder: ${hydra.sweep.dir}/.submitit/%j" in launcher
