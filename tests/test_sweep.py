"""`diffstage generate -m ...`: a labelled grid and a table of the jobs; failing jobs are recorded and the
sweep goes on, then the command exits non-zero."""
import json

from PIL import Image

from test_cli import run
from diffstage.sweep import varying


def rows_of(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_seed_sweep_leaves_a_grid_and_a_table(tmp_path):
    stale = tmp_path / ".diffstage-sweep"  # an earlier sweep's rows (and a file that is not one) in the same folder
    stale.mkdir()
    (stale / "job-7.json").write_text('{"job": 7, "overrides": {}, "error": null}')
    (stale / "job-x.json").write_text("not a row")
    r = run("generate", "-m", "seed=1,2,3", "sampling.num_inference_steps=2", f"hydra.sweep.dir={tmp_path}",
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-2:] == [str(tmp_path / "sweep_grid.png"), str(tmp_path / "sweep.jsonl")]
    rows = rows_of(tmp_path / "sweep.jsonl")
    assert [(row["job"], row["overrides"], row["seed"], row["error"]) for row in rows] == [
        (0, {"seed": "1", "sampling.num_inference_steps": "2"}, 1, None),
        (1, {"seed": "2", "sampling.num_inference_steps": "2"}, 2, None),
        (2, {"seed": "3", "sampling.num_inference_steps": "2"}, 3, None)]
    assert all(Image.open(row["images"][0]).size == (32, 32) for row in rows)
    assert set(rows[0]["timings"]) == {"0:InputValidationStage", "1:TextEncodingStage", "2:LatentPreparationStage",
                                       "3:TimestepPreparationStage", "4:DenoisingStage", "5:DecodingStage"}
    assert [row["reused"] for row in rows] == [[], ["1:TextEncodingStage"], ["1:TextEncodingStage"]]
    assert sorted(p.name for p in stale.iterdir()) == ["job-x.json"]  # this sweep's rows are removed, not others
    grid = Image.open(tmp_path / "sweep_grid.png")
    assert grid.size == (3 * 196 + 4, 196 + 14 + 4)  # one row of three 192-pixel cells with labels
    assert json.loads(grid.text["sweep"])[2] == {"job": 2, "overrides": {"seed": "3",
                                                                          "sampling.num_inference_steps": "2"}}


def test_a_failing_job_is_recorded_and_the_others_finish(tmp_path):
    r = run("generate", "-m", "sampling.height=32,33", "sampling.num_inference_steps=1",
            f"hydra.sweep.dir={tmp_path}", cwd=tmp_path)
    assert r.returncode == 2
    assert "error: invalid request:\n  - height must be a positive multiple of 16 (at most 65536), got 33" in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: 1 of 2 sweep jobs failed (see {tmp_path / 'sweep.jsonl'}): job 1: invalid request: - height must "
        "be a positive multiple of 16 (at most 65536), got 33")
    good, bad = rows_of(tmp_path / "sweep.jsonl")
    assert good["error"] is None and (tmp_path / "0" / "image.png").is_file()
    assert bad["images"] == [] and "got 33" in bad["error"] and not (tmp_path / "1" / "image.png").exists()
    assert (tmp_path / "sweep_grid.png").is_file()


def test_a_single_run_writes_no_report(tmp_path):
    r = run("generate", "sampling.num_inference_steps=1", f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hydra", "diffstage.log", "image.png"]


def test_labels_name_only_what_varies():
    rows = [{"overrides": {"seed": "1", "model": "digits"}}, {"overrides": {"seed": "2", "model": "digits"}}]
    assert varying(rows) == ["seed"]
    assert varying(rows[:1]) == []


def test_a_sweep_whose_rows_cannot_be_seen_is_an_error(tmp_path):
    """Jobs on other machines whose sweep directory is not shared with the command leave it no rows: that is said,
    not a silent empty report."""
    from diffstage.sweep import STATE, finish_report

    STATE.active, STATE.report = True, []
    finish_report(tmp_path)
    assert STATE.report_error == (f"no job wrote its row into {tmp_path.resolve() / '.diffstage-sweep'} (jobs on "
                                  "other machines need hydra.sweep.dir on a file system every node shares)")
    assert STATE.report == [] and not STATE.active and list(tmp_path.iterdir()) == []
