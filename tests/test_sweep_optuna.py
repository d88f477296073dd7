"""The README's worked example of Hydra's Optuna sweeper (conf/hydra/sweeper/tune_cache.yaml), at a small size: each
trial returns its seconds per image, +inf when its image is further than objective.psnr_min from the uncached
reference, and Optuna finds the fastest setting that keeps the bound."""
import json
import math

import pytest
import yaml

from test_cli import run

pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")

SMALL = ("hydra.sweeper.n_trials=5", "sampling.num_inference_steps=choice(4,8)", "objective.reference_steps=8")


def rows_of(folder):
    return [json.loads(line) for line in (folder / "sweep.jsonl").read_text().splitlines()]


def test_optuna_finds_the_fastest_setting_within_the_psnr_bound(tmp_path):
    result = run("generate", "-m", "hydra/sweeper=tune_cache", *SMALL, "cache=teacache", "objective.metric=seconds",
                 "objective.psnr_min=25", f"hydra.sweep.dir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Sampler: TPESampler" in result.stderr
    found = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    rows = rows_of(tmp_path)
    assert len(rows) == 5 and all(row["error"] is None for row in rows)
    steps = {row["overrides"]["sampling.num_inference_steps"] for row in rows}
    assert steps <= {"4", "8"} and all(0.05 <= float(row["overrides"]["cache.threshold"]) <= 0.6 for row in rows)
    for row in rows:  # each trial's score: its own seconds, and +inf (null here) exactly when it missed the bound
        score = row["score"]
        assert score["seconds_per_image"] == pytest.approx(sum(row["timings"].values()))
        met = score["psnr"] is None or score["psnr"] >= 25  # null: identical to the reference
        assert score["objective"] == (score["seconds_per_image"] if met else None)
    best = [row for row in rows if row["score"]["objective"] == found["best_value"]]
    assert len(best) == 1 and math.isfinite(found["best_value"])  # a setting was found, and it keeps the bound
    assert found["best_value"] == min(r["score"]["objective"] for r in rows if r["score"]["objective"] is not None)
    assert found["best_params"] == {"cache.threshold": float(best[0]["overrides"]["cache.threshold"]),
                                    "sampling.num_inference_steps": int(best[0]["overrides"][
                                        "sampling.num_inference_steps"])}


def test_a_bound_no_job_meets_and_a_failing_job_score_inf(tmp_path):
    """Optuna's grid over a valid and an invalid height: the invalid job fails and scores +inf (the sweep goes on),
    and with a bound nothing meets the command says so."""
    result = run("generate", "-m", "hydra/sweeper=optuna", "hydra/sweeper/sampler=grid",
                 "sampling.height=choice(32,33)", "sampling.num_inference_steps=2", "cache=teacache",
                 "objective.metric=seconds", "objective.psnr_min=300", "objective.reference_steps=4",
                 f"hydra.sweep.dir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 2
    assert f"note: no job of this sweep met objective.psnr_min (see the psnr of each in {tmp_path / 'sweep.jsonl'}); " \
           "the sweeper saw +inf for every one" in result.stderr
    assert "error: 1 of 2 sweep jobs failed" in result.stderr
    assert yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())["best_value"] == math.inf
    good, bad = sorted(rows_of(tmp_path), key=lambda row: row["overrides"]["sampling.height"])
    assert good["score"]["objective"] is None and 10 < good["score"]["psnr"] < 300  # 2 steps against 4
    assert "score" not in bad and "got 33" in bad["error"]


@pytest.mark.parametrize("override, message", [
    ("objective.metric=speed", "objective.metric must be one of seconds (or null), got 'speed'"),
    ("objective.psnr_min=30", "objective.psnr_min is set but objective.metric is not: set objective.metric=seconds"),
    ("objective.reference_steps=0", "objective.reference_steps must be a positive integer (or null), got 0"),
])
def test_objective_settings_are_checked_before_anything_loads(override, message, tmp_path):
    extra = ["objective.metric=seconds"] if "reference_steps" in override else []
    result = run("generate", override, *extra, f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-2:] == ["error: invalid run config:", f"  - {message}"]


def test_optuna_without_an_objective_says_what_to_set(tmp_path):
    result = run("generate", "-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=2", "seed=choice(0,1)",
                 f"hydra.sweep.dir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: this sweeper minimizes a number that each job returns: set objective.metric=seconds (and "
        "objective.psnr_min for a quality bound; README \"Tuning settings with Optuna\")")
    assert "Traceback" not in result.stderr


def test_an_optimizing_sweeper_under_torchrun_is_refused(tmp_path):
    """Each torchrun process would run its own sampler on its own timings, and the ranks would part ways."""
    result = run("generate", "-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=2", "seed=choice(0,1)",
                 "objective.metric=seconds", f"hydra.sweep.dir={tmp_path}", cwd=tmp_path,
                 env={"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: an optimizing sweeper cannot run under torchrun: each process would pick its own settings from its "
        "own timings; run the sweep in one process (or on a launcher)")
