"""The `diffstage` command end to end, in subprocesses."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import REPO, line_of

EXE = Path(sys.executable).parent / "diffstage"
SMALL = ["sampling.num_inference_steps=2", "sampling.height=32", "sampling.width=32", "sampling.max_sequence_length=16"]


def run(*args, cwd=None, env=None):
    cmd = [str(EXE)] if EXE.exists() else [sys.executable, "-m", "diffstage.cli"]
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(cmd + list(args), capture_output=True, text=True, cwd=cwd, env=full_env, timeout=300)


def test_generate_writes_png_with_metadata(tiny_flux_dev, tmp_path):
    r = run("generate", "model=flux", f"model_path={tiny_flux_dev}", "prompt=a red fox", "seed=3",
            f"hydra.run.dir={tmp_path / 'run'}", *SMALL, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    path = Path(r.stdout.strip().splitlines()[-1])
    assert path == tmp_path / "run" / "image.png" and path.is_file()
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    image = Image.open(path)
    assert image.size == (32, 32)
    assert image.text["prompt"] == "a red fox" and image.text["seed"] == "3" and image.text["model"] == "flux"
    assert "pipeline_name: FluxPipeline" in image.text["config"] and "num_inference_steps: 2" in image.text["config"]


def test_multirun_sweep_loads_weights_once(tiny_flux_dev, tmp_path):
    r = run("generate", "-m", "model=flux", f"model_path={tiny_flux_dev}", "seed=0,1",
            f"hydra.sweep.dir={tmp_path / 'sweep'}", *SMALL, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    paths = [Path(line) for line in r.stdout.splitlines() if line.endswith("image.png")]
    assert len(paths) == 2 and all(p.is_file() for p in paths)
    assert {p.parent.name for p in paths} == {"0", "1"}
    assert Image.open(paths[0]).tobytes() != Image.open(paths[1]).tobytes()
    assert (r.stdout + r.stderr).count("loaded transformer") == 1


def test_hydra_flags_work():
    r = run("generate", "--cfg", "job", "seed=5")
    assert r.returncode == 0 and "seed: 5" in r.stdout
    r = run("generate", "--help")
    assert r.returncode == 0 and "sampling" in r.stdout and "diffstage is powered by Hydra" in r.stdout
    r = run("generate", "--info", "searchpath")
    assert r.returncode == 0 and "pkg://diffstage.conf" in r.stdout


def test_bad_override_exit_2_no_traceback():
    r = run("generate", "no_such_key=1")
    assert r.returncode == 2
    assert "unknown key 'no_such_key'; known: model, model_path" in r.stderr and "Traceback" not in r.stderr


def test_generate_errors_are_clean(tmp_path):
    r = run("generate", "model=flx", f"hydra.run.dir={tmp_path}")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "error: unknown model 'flx'; did you mean 'flux'?" in r.stderr
    r = run("generate", "model=flux", f"model_path={tmp_path / 'nothing'}", f"hydra.run.dir={tmp_path}")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "does not exist" in r.stderr
    r = run("generate", "model=flux", f"hydra.run.dir={tmp_path}", env={"DIFFSTAGE_DEBUG": "1"})
    assert r.returncode != 0 and "Traceback" in r.stderr  # debug mode shows it


@pytest.mark.parametrize("yaml_file", sorted((REPO / "pipelines_yaml").glob("*.yaml")), ids=lambda p: p.stem)
def test_validate_every_shipped_yaml(yaml_file):
    r = run("validate", yaml_file.stem)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"OK {yaml_file}")


def test_validate_malformed_yaml_reports_everything(flux_yaml_variant):
    path = flux_yaml_variant(
        ("stages:\n", "stagse: 1\nstages:\n"),
        ("  height: 1024", "  height: tall"),
        ("      mu: diffstage", "      muu: diffstage"),
        ("  - _target_: diffstage.stages.LatentPreparationStage\n", ""),
        ("diffstage.stages.DecodingStage", "os.system"),
    )
    r = run("validate", str(path))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    err = r.stderr
    assert err.startswith("error: ") and "problems in model spec:" in err
    assert f"{path}:{line_of(path, 'stagse')}: stagse: unknown key 'stagse'" in err
    assert f"{path}:{line_of(path, 'height: tall')}: sampling.height:" in err
    assert f"{path}:{line_of(path, 'muu:')}: pipeline_config.callbacks.timestep_preparation.muu: callback 'muu'" in err
    assert f"{path}:{line_of(path, 'os.system')}: stages[4]._target_: 'os.system' is outside the import allowlist" in err
    assert (f"{path}:{line_of(path, 'TimestepPreparationStage')}: stages[2]: [TimestepPreparationStage] reads "
            "'latents' but no earlier stage writes it") in err
    assert (f"{path}:{line_of(path, 'model_inputs:')}: pipeline_config.callbacks.denoising.model_inputs: "
            "[DenoisingStage] callback 'denoising.model_inputs' reads 'image_position_ids' but no earlier stage "
            "writes it") in err  # FLUX's callback declares it with @reads
    assert err.startswith("error: 7 problems in model spec:")


def test_validate_syntax_error_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    r = run("validate", str(bad))
    assert r.returncode == 2 and f"{bad}:" in r.stderr and "YAML syntax error" in r.stderr
    r = run("validate", str(tmp_path / "none.yaml"))
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_os_system_never_runs(flux_yaml_variant, tmp_path):
    marker = tmp_path / "pwned"
    path = flux_yaml_variant(("  - _target_: diffstage.stages.DecodingStage\n",
                              f"  - _target_: os.system\n    command: touch {marker}\n"))
    r = run("generate", f"model={path}", f"hydra.run.dir={tmp_path}")
    assert r.returncode == 2 and "'os.system' is outside the import allowlist" in r.stderr
    assert not marker.exists()


def test_models_lists_tasks_and_descriptions():
    r = run("models")
    assert r.returncode == 0
    rows = {line.split()[0]: line.split()[1:] for line in r.stdout.splitlines()}
    assert rows["flux"][0] == "t2i" and "FLUX.1 [dev]" in " ".join(rows["flux"])
    assert rows["digits"][0] == "t2i"  # the task comes through `extends: flux`
    assert rows["sd3"][:3] == ["t2i", "Stable", "Diffusion"] and "flux_schnell" in rows


def test_usage_and_unknown_command():
    r = run()
    assert r.returncode == 2 and "usage: diffstage" in r.stdout
    r = run("generat")
    assert r.returncode == 2 and "unknown command 'generat'; did you mean 'generate'?" in r.stderr
    assert shutil.which("diffstage") or EXE.exists()


def test_request_out_of_range_fails_before_loading(tiny_flux_dev, tmp_path):
    r = run("generate", "model=flux", f"model_path={tiny_flux_dev}", "sampling.height=30", "seed=abc",
            f"hydra.run.dir={tmp_path}", *SMALL[:1])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "height must be a positive multiple of 16 (at most 65536), got 30" in r.stderr
    assert "seed must be an integer in [-2**63, 2**64 - 1], got 'abc'" in r.stderr
    assert "loaded transformer" not in r.stderr  # nothing was loaded


def test_output_filename_must_be_a_png_name(tmp_path):
    r = run("generate", "output.filename=sub/x.jpg", f"hydra.run.dir={tmp_path}")
    assert r.returncode == 2 and "output.filename must be a file name ending in .png" in r.stderr


def test_sheet_lays_out_prompts_and_seeds(tiny_flux_dev, tmp_path):
    r = run("sheet", "model=flux", f"model_path={tiny_flux_dev}", "prompts={fox: a red fox, cat: a blue cat}",
            "seeds=[0,1]", f"hydra.run.dir={tmp_path}", *SMALL)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines() == [str(tmp_path / "sheet.png")]  # logs go to stderr
    sheet = Image.open(tmp_path / "sheet.png")
    assert sheet.size == (2 * (96 + 4) + 4, 2 * (96 + 14 + 4) + 4)  # 2 prompts x 2 seeds of 96 px cells
    r = run("sheet", "model=flux", f"model_path={tiny_flux_dev}", "prompts=[a fox]", "seeds=[]", f"hydra.run.dir={tmp_path}")
    assert r.returncode == 2 and "seeds must be a non-empty list of integers such as seeds=[0,1], got []" in r.stderr
    assert sheet.text["prompt"] == "a red fox; a blue cat" and sheet.text["seed"] == "0,1"
    r = run("sheet", "model=flux", f"model_path={tiny_flux_dev}", f"hydra.run.dir={tmp_path}")
    assert r.returncode == 2 and "this model's YAML has no `examples`; pass prompts=[...]" in r.stderr


def test_readme_main_command_draws_the_digit(tmp_path):
    """`diffstage generate prompt=...` with no other argument: the embedded digits model, offline."""
    from diffstage.models.digits.classifier import classify
    import numpy as np

    r = run("generate", "prompt=a handwritten digit seven", f"hydra.run.dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    path = Path(r.stdout.strip().splitlines()[-1])
    image = Image.open(path)
    assert image.size == (32, 32) and image.text["model"] == "digits"
    assert classify(np.asarray(image, dtype=np.float32)[None] / 255)[0] == 7


def test_sheet_of_the_default_model(tmp_path):
    """`make sheet`: the ten example prompts of digits, with its default negative prompt ""."""
    r = run("sheet", f"hydra.run.dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    sheet = Image.open(tmp_path / "sheet.png")
    assert sheet.size == (10 * (96 + 4) + 4, 96 + 14 + 4 + 4) and sheet.text["model"] == "digits"
