"""Outputs survive odd input and odd surroundings (issue 18, items 6, 7, 8, 10, 11): labels with control
characters, long prompts in video metadata, malformed environment variables, a full stdout, torchrun ranks
other than 0, and builder specs the YAML reader would refuse."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from test_cli import run

STEPS = "sampling.num_inference_steps=1"
TORCHRUN = Path(sys.executable).with_name("torchrun")


def run_patched(patch: str, *args, cwd=None):
    """`diffstage ARGS` in a fresh Python whose `patch` code ran first (to make one step fail on purpose)."""
    code = f"{patch}\nfrom diffstage.cli import main\nmain({list(args)!r})"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


BROKEN_SHEET = ("import diffstage.sheet as s\n"
                "def boom(*a, **k): raise RuntimeError('no room for labels')\n"
                "s.contact_sheet = boom")


# --- item 6: labels are drawn as text, whatever they hold -------------------------------------------------
@pytest.mark.parametrize("label, shown", [
    ("a\nb", "a⏎b"), ("tab\there", "tab here"), ("bell\x07", "bell�"), ("\u202eevil", "�evil"),
    ("a\r\nb", "a⏎b"), ("中文 ok", "中文 ok"),
])
def test_labels_lose_their_control_characters(label, shown):
    from diffstage.sheet import label_text

    assert label_text(label) == shown


def test_a_contact_sheet_draws_any_label():
    from diffstage.sheet import contact_sheet

    labels = ["line one\nline two", "bell\x07", "\u202bright to left\u202c", "x" * 100_000, "字" * 12_000, ""]
    images = [Image.new("RGB", (16, 16), (i * 40, 0, 0)) for i in range(len(labels))]
    sheet = contact_sheet(images, labels, columns=3, cell=64)
    assert sheet.size == (3 * 68 + 4, 2 * (64 + 14 + 4) + 4)


def test_a_contact_sheet_draws_any_label_in_pillows_bitmap_font(monkeypatch):
    """Pillow built without FreeType has only a Latin-1 bitmap font: other characters become "?"."""
    from PIL import ImageFont

    from diffstage.sheet import contact_sheet

    monkeypatch.setattr(ImageFont, "load_default", lambda *a, **k: ImageFont.load_default_imagefont())
    sheet = contact_sheet([Image.new("RGB", (8, 8))] * 3, ["中文\nx", "y" * 500, "ok"], cell=64)
    assert sheet.size == (3 * 68 + 4, 64 + 14 + 8)


def test_sheet_with_a_newline_in_a_prompt(tmp_path):
    r = run("sheet", 'prompts=["one\ntwo","three"]', STEPS, f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == str(tmp_path / "sheet.png")
    assert Image.open(tmp_path / "sheet.png").size[0] > 0


def test_sweep_with_a_newline_in_a_prompt_keeps_its_grid(tmp_path):
    r = run("generate", "-m", 'prompt="one\ntwo","three"', STEPS, f"hydra.sweep.dir={tmp_path}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-2:] == [str(tmp_path / "sweep_grid.png"), str(tmp_path / "sweep.jsonl")]


def test_a_sweep_grid_that_cannot_be_drawn_keeps_the_table_and_exits_2(tmp_path):
    r = run_patched(BROKEN_SHEET, "generate", "-m", "seed=1,2", STEPS, f"hydra.sweep.dir={tmp_path}", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stdout.strip().splitlines()[-1] == str(tmp_path / "sweep.jsonl")
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: the sweep report is incomplete: cannot draw or write {tmp_path / 'sweep_grid.png'}: RuntimeError: "
        f"no room for labels (the table is in {tmp_path / 'sweep.jsonl'})")
    assert len((tmp_path / "sweep.jsonl").read_text().splitlines()) == 2
    assert "Traceback" not in r.stderr and not (tmp_path / "sweep_grid.png").exists()


def test_a_sheet_that_cannot_be_drawn_keeps_its_images_and_exits_2(tmp_path):
    r = run_patched(BROKEN_SHEET, "sheet", 'prompts=["a","b"]', STEPS, f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    kept = [tmp_path / "sheet_0.png", tmp_path / "sheet_1.png"]
    assert r.stdout.strip().splitlines()[-2:] == [str(p) for p in kept]
    assert all(Image.open(p).size == (32, 32) for p in kept)
    assert r.stderr.strip().splitlines()[-1] == (
        "error: cannot draw the contact sheet: RuntimeError: no room for labels (its 2 images are saved one by one "
        "beside it)")
    assert "Traceback" not in r.stderr


# --- item 7: video metadata of any allowed prompt ---------------------------------------------------------
@pytest.mark.parametrize("prompt", ["a" * 70_000, "视频" * 6_000], ids=["ascii-70k", "cjk-12k"])
def test_a_long_prompt_goes_into_the_mp4(prompt, tmp_path):
    pytest.importorskip("imageio_ffmpeg")
    from diffstage.video import read_mp4, read_mp4_metadata, save_mp4

    frames = np.random.default_rng(0).random((3, 16, 16, 3))
    meta = {"prompt": prompt, "seed": "0", "config": f"prompt: {prompt}\nname: x\n"}
    path = save_mp4(frames, tmp_path / "video.mp4", meta)
    assert path == tmp_path / "video.mp4"
    assert json.loads(read_mp4_metadata(path)["comment"]) == meta
    assert read_mp4(path)[0].shape == (3, 16, 16, 3)


def test_metadata_with_ffmetadata_specials_reads_back(tmp_path):
    pytest.importorskip("imageio_ffmpeg")
    from diffstage.video import read_mp4_metadata, save_mp4

    meta = {"prompt": "a=b; #c \\ d\nnew line", "seed": "1"}
    path = save_mp4(np.zeros((2, 16, 16, 3), dtype=np.uint8), tmp_path / "v.mp4", meta)
    assert json.loads(read_mp4_metadata(path)["comment"]) == meta


def test_ffmpeg_failures_name_the_file_and_leave_no_metadata_file(tmp_path):
    imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")
    from diffstage.errors import OutputError
    from diffstage.video import _remux_with_metadata, read_mp4_metadata

    not_video = tmp_path / "not.mp4"
    not_video.write_text("no video here")
    with pytest.raises(OutputError, match=f"cannot read the metadata of '{not_video}': "):
        read_mp4_metadata(not_video)
    out = tmp_path / "out.mp4"
    with pytest.raises(OutputError, match="ffmpeg could not add the metadata: "):
        _remux_with_metadata(imageio_ffmpeg, str(not_video), {"prompt": "x"}, str(out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not.mp4"]


# --- item 8: environment variables and stdout -------------------------------------------------------------
def test_a_bad_dist_timeout_does_not_break_other_commands():
    r = run("validate", "digits", env={"DIFFSTAGE_DIST_TIMEOUT": "abc"})
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("env, message", [
    ({"DIFFSTAGE_DIST_TIMEOUT": "abc"}, "error: environment variable DIFFSTAGE_DIST_TIMEOUT='abc': expected a whole "
                                        "number of seconds, from 1 to 604800 (how long a rank waits for the others)"),
    ({"DIFFSTAGE_DIST_TIMEOUT": "0"}, "error: environment variable DIFFSTAGE_DIST_TIMEOUT='0': expected a whole "
                                      "number of seconds, from 1 to 604800"),
    ({"WORLD_SIZE": "two"}, "error: environment variable WORLD_SIZE='two': expected a whole number, at least 1 "
                            "(torchrun sets it: the number of processes)"),
    ({"RANK": "-1"}, "error: environment variable RANK='-1': expected a whole number, at least 0 (torchrun sets it: "
                     "this process's index)"),
])
def test_bad_environment_variables_exit_2_naming_them(env, message, tmp_path):
    full = {"WORLD_SIZE": "2", "RANK": "0", "DIFFSTAGE_DIST_TIMEOUT": "5", **env}
    r = run("generate", "parallel.cfg=2", STEPS, f"hydra.run.dir={tmp_path}", cwd=tmp_path, env=full)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_a_bad_world_size_in_the_python_api(monkeypatch):
    from diffstage import DiffstageError
    from diffstage.distributed.state import launched_world

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(DiffstageError, match="environment variable WORLD_SIZE='two': expected a whole number"):
        launched_world()


def full_stdout(*args, cwd=None):
    cmd = [str(Path(sys.executable).with_name("diffstage"))] + list(args)
    with open("/dev/full", "w") as full:
        return subprocess.run(cmd, stdout=full, stderr=subprocess.PIPE, text=True, cwd=cwd, timeout=300,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.mark.parametrize("args", [["models"], ["validate", "digits"], ["graph", "digits"], ["schema"], ["--version"],
                                  ["--help"], ["generate", "--cfg", "job"]])
def test_a_full_stdout_is_named(args):
    r = full_stdout(*args)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == ["error: cannot write to standard output: No space left on device"]


def test_a_full_stdout_after_generating_names_stdout_not_the_run_directory(tmp_path):
    r = full_stdout("generate", STEPS, f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1] == "error: cannot write to standard output: No space left on device"
    assert "run directory" not in r.stderr and "Traceback" not in r.stderr
    assert (tmp_path / "image.png").is_file()  # the image itself was written


# --- item 10: torchrun writes outputs once, from rank 0, and leaves no temp directories ------------------------
def torchrun(tmp_path, *args):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "DIFFSTAGE_DIST_TIMEOUT": "120",
           "TMPDIR": str(scratch)}
    r = subprocess.run([str(TORCHRUN), "--standalone", "--nproc-per-node=2", "-m", "diffstage", *args,
                        "parallel.cfg=2", STEPS], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    leftovers = sorted(p.name for p in scratch.iterdir() if p.name.startswith("diffstage-rank-"))
    return r, leftovers


def test_torchrun_sheet_is_written_once(tmp_path):
    r, leftovers = torchrun(tmp_path, "sheet", 'prompts=["a","b"]', f"hydra.run.dir={tmp_path / 'run'}")
    assert [line for line in r.stdout.splitlines() if line.endswith(".png")] == [str(tmp_path / "run" / "sheet.png")]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".hydra", "diffstage.log", "sheet.png"]
    assert leftovers == []


def test_torchrun_sweep_writes_one_report(tmp_path):
    r, leftovers = torchrun(tmp_path, "generate", "-m", "seed=1,2", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    reports = [line for line in r.stdout.splitlines() if line.endswith(("sweep_grid.png", "sweep.jsonl"))]
    assert reports == [str(tmp_path / "sweep" / "sweep_grid.png"), str(tmp_path / "sweep" / "sweep.jsonl")]
    assert len((tmp_path / "sweep" / "sweep.jsonl").read_text().splitlines()) == 2
    assert leftovers == []


# --- item 11: to_yaml refuses what validate would refuse ------------------------------------------------------
def nested(depth):
    value = "leaf"
    for _ in range(depth):
        value = {"k": value}
    return value


@pytest.mark.parametrize("edit, message", [
    (lambda b: b.set_settings(deep=nested(80)), "nested more than 64 levels deep"),
    (lambda b: b.set_settings(many=list(range(60_000))),
     "the value here expands to more than 50,000 values through its aliases (*name); a model YAML needs far fewer"),
    (lambda b: b.set(description="d" * 2_000_000), "bytes; a model YAML may be at most 1,048,576"),
])
def test_to_yaml_refuses_what_validate_refuses(edit, message, tmp_path):
    from diffstage import PipelineBuilder, SpecError

    builder = PipelineBuilder.from_yaml("digits")
    edit(builder)
    assert any(message in str(p) for p in builder.check()), builder.check()
    with pytest.raises(SpecError, match=message.replace("(", r"\(").replace(")", r"\)").replace("*", r"\*")) as e:
        builder.to_yaml(tmp_path / "out.yaml")
    assert str(tmp_path / "out.yaml") in str(e.value)
    assert list(tmp_path.iterdir()) == []
    # what validate says about the same text, written by hand
    from diffstage.builder import check_model
    import yaml

    (tmp_path / "hand.yaml").write_text(yaml.safe_dump(builder.data, sort_keys=False, allow_unicode=True, width=120))
    with pytest.raises(SpecError, match=message.replace("(", r"\(").replace(")", r"\)").replace("*", r"\*")):
        check_model(str(tmp_path / "hand.yaml"))


@pytest.mark.parametrize("value, message", [
    (lambda: __import__("torch").zeros(2), "pipeline_config.settings.bad: a Tensor cannot be written as YAML "
                                           "(use numbers, strings, booleans, null, lists and mappings)"),
    (lambda: 10 ** 5000, "pipeline_config.settings.bad: an integer of 5001 figures cannot be written as YAML "
                         "(a YAML reader takes at most 4300)"),
    (lambda: {("a", "b"): 1}, "pipeline_config.settings.bad: the key ('a', 'b') is a tuple; YAML keys here must "
                              "be strings, numbers, booleans or null"),
])
def test_to_yaml_names_the_key_of_a_value_yaml_cannot_hold(value, message, tmp_path):
    from diffstage import DiffstageError, PipelineBuilder

    builder = PipelineBuilder.from_yaml("digits")
    builder.set_settings(bad=value())
    with pytest.raises(DiffstageError) as e:
        builder.to_yaml(tmp_path / "out.yaml")
    assert message in str(e.value)
    assert list(tmp_path.iterdir()) == []
    assert any(message in str(p) for p in builder.check())


def test_to_yaml_still_writes_a_sound_spec(tmp_path):
    from diffstage import PipelineBuilder
    from diffstage.builder import check_model

    builder = PipelineBuilder.from_yaml("digits")
    builder.set_settings(deep=nested(10), many=list(range(100)))
    assert builder.check() == []
    check_model(str(builder.to_yaml(tmp_path / "out.yaml")))


def test_to_yaml_refuses_very_deep_and_self_containing_values_without_recursing(tmp_path):
    from diffstage import PipelineBuilder, SpecError

    loop = [1]
    loop.append(loop)
    for value, message in [
            (nested(20_000), "pipeline_config.settings.deep.k.k"),
            (nested(20_000), "nested more than 64 levels deep; a model YAML needs far fewer"),
            (loop, "an alias (*name) refers to a value that contains it")]:
        builder = PipelineBuilder.from_yaml("digits")
        builder.data["pipeline_config"]["settings"] = {"deep": value}  # set_settings refuses these itself
        with pytest.raises(SpecError) as e:
            builder.to_yaml(tmp_path / "out.yaml")
        assert message in str(e.value)
        assert any(message in str(p) for p in builder.check())
    assert list(tmp_path.iterdir()) == []


def test_setting_a_value_nested_thousands_deep_is_refused_by_key():
    from diffstage import DiffstageError, PipelineBuilder

    with pytest.raises(DiffstageError, match="^deep: nested more than 64 levels deep; a model YAML needs far fewer$"):
        PipelineBuilder.from_yaml("digits").set_settings(deep=nested(20_000))
