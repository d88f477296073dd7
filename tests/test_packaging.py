"""A wheel installs one namespace, `diffstage`, with the YAMLs and Hydra configs as package data."""
import os
import subprocess
import sys
import zipfile

import pytest

from conftest import REPO


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(out), str(REPO)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    (path,) = out.glob("diffstage-*.whl")
    return path


def test_wheel_has_only_the_diffstage_namespace(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"diffstage", next(t for t in tops if t.endswith(".dist-info"))}
    for expected in ("diffstage/cli/__init__.py", "diffstage/attention/backends.py", "diffstage/kernels/reference.py", "diffstage/conf/attention/sdpa.yaml", "diffstage/stages/denoising.py", "diffstage/models/flux/callbacks.py",
                     "diffstage/pipelines_yaml/flux.yaml", "diffstage/pipelines_yaml/flux_schnell.yaml",
                     "diffstage/pipelines_yaml/sd3.yaml", "diffstage/models/sd3/callbacks.py",
                     "diffstage/pipelines_yaml/wan_t2v.yaml", "diffstage/models/wan/callbacks.py",
                     "diffstage/pipelines_yaml/pixart_sigma.yaml", "diffstage/models/pixart/callbacks.py",
                     "diffstage/pipelines_yaml/diffusers_auto.yaml", "diffstage/stages/diffusers_pipeline.py",
                     "diffstage/pipelines_yaml/qwen_image.yaml", "diffstage/models/qwen_image/callbacks.py",
                     "diffstage/conf/config.yaml", "diffstage/conf/sheet.yaml", "diffstage/conf/hydra/launcher/slurm.yaml", "diffstage/conf/runtime/cpu.yaml",
                     "diffstage/pipelines_yaml/digits.yaml", "diffstage/models/digits/README.md",
                     "diffstage/models/digits/checkpoint/model_index.json",
                     "diffstage/models/digits/checkpoint/transformer/diffusion_pytorch_model.safetensors"):
        assert expected in names


def test_wheel_install_runs(wheel, tmp_path):
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                        str(wheel)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    for bad in ("framework", "stages", "models", "conf", "pipelines_yaml"):
        assert not (target / bad).exists()
    env = {**os.environ, "PYTHONPATH": str(target)}
    # The digits YAML's relative model_path must find the checkpoint in the installed layout too.
    code = ("import diffstage, sys; from diffstage.cli import main; from diffstage.models_dir import model_yaml; "
            "assert diffstage.__file__.startswith(sys.argv[1]), diffstage.__file__; "
            "ckpt = model_yaml('digits').parent / diffstage.check_model('digits').spec.model_path; "
            "assert (ckpt / 'model_index.json').is_file(), ckpt; main(['validate', 'flux'])")
    r = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, text=True, env=env,
                       cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "OK " in r.stdout and str(target) in r.stdout
