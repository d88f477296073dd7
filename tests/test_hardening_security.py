"""Security items of the second hardening round (issue 18): checkpoints that smuggle pickle past the
safetensors check, images that make Pillow start Ghostscript, `diffusers_auto` calling what
`_class_name` names, its missing NaN checks, and checkpoint configs and folders that hang the loader."""
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from test_cli import SMALL, run
from diffstage import DiffstageError, LoadError, UnsafeCheckpointError, build_pipeline, check_model, loader
from diffstage import checkpoint_files


def clean_exit_2(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    for needle in needles:
        assert needle in r.stderr, r.stderr


@pytest.fixture(scope="module")
def pixart_ckpt(tmp_path_factory):
    from diffstage.models.pixart.tiny import build_tiny_pixart

    return build_tiny_pixart(tmp_path_factory.mktemp("ckpt") / "tiny-pixart")


@pytest.fixture
def ckpt(pixart_ckpt, tmp_path):
    """A private copy of the tiny PixArt-Sigma checkpoint to damage."""
    copy = tmp_path / "ckpt"
    shutil.copytree(pixart_ckpt, copy)
    loader.clear_cache()
    yield copy
    loader.clear_cache()


class WritesMarker:
    """Unpickling this creates the marker file (through `open`): proof that pickle ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def plant_pickle_decoy(folder: Path, shard: bytes) -> Path:
    """The decoy of issue 18: an empty *.safetensors beside a safetensors index that names a .bin shard."""
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    (folder / "decoy.safetensors").write_bytes(b"")
    (folder / "diffusion_pytorch_model.bin").write_bytes(shard)
    weight_map = {"encoder.conv_in.weight": "diffusion_pytorch_model.bin"}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder / "diffusion_pytorch_model.bin"


@pytest.fixture
def torch_load_calls(monkeypatch):
    """Every torch.load call in this process (Diffusers and Transformers call it for pickle weights)."""
    calls = []
    real = torch.load

    def spy(*args, **kwargs):
        calls.append(args[0] if args else kwargs.get("f"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    return calls


# 1. pickle through a decoy --------------------------------------------------------------------
@pytest.mark.parametrize("model", ["pixart_sigma", "diffusers_auto"])
def test_a_safetensors_index_naming_a_pickle_shard_is_refused_before_torch_load(ckpt, model, torch_load_calls):
    from diffusers import AutoencoderKL

    state = AutoencoderKL.from_pretrained(ckpt / "vae").state_dict()
    shard = ckpt / "vae" / "shard.pt"
    torch.save(state, shard)  # a valid pickle state dict: today's loader reads it and exits 0
    bin_file = plant_pickle_decoy(ckpt / "vae", shard.read_bytes())
    shard.unlink()
    index = json.loads((ckpt / "vae" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    index["weight_map"] = {name: bin_file.name for name in state}
    (ckpt / "vae" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UnsafeCheckpointError) as e:
        loader.load_modules(check_model(model).spec, ckpt)
    message = str(e.value)
    assert message.startswith("module 'vae': ") and "diffusion_pytorch_model.safetensors.index.json names the " \
        "weight file 'diffusion_pytorch_model.bin', which is not a safetensors file" in message, message
    assert "allow_pickle=true" in message
    assert torch_load_calls == []


@pytest.mark.parametrize("model", ["pixart_sigma", "diffusers_auto"])
def test_the_decoy_from_the_cli_exits_2_and_unpickles_nothing(ckpt, model, tmp_path):
    marker = tmp_path / "unpickled"
    plant_pickle_decoy(ckpt / "vae", pickle.dumps(WritesMarker(marker)))
    r = run("generate", f"model={model}", f"model_path={ckpt}", f"hydra.run.dir={tmp_path / 'run'}", *SMALL)
    clean_exit_2(r, "module 'vae': ", "names the weight file 'diffusion_pytorch_model.bin', which is not a "
                 "safetensors file", "set allow_pickle=true if you trust its source")
    assert not marker.exists()
    assert not list(tmp_path.rglob("*.png"))


def test_a_transformers_weights_entry_naming_a_pickle_is_refused(ckpt, torch_load_calls):
    config_file = ckpt / "text_encoder" / "config.json"
    config = json.loads(config_file.read_text())
    config["transformers_weights"] = "adapter_model.bin"  # Transformers reads this one name with torch.load
    config_file.write_text(json.dumps(config))
    (ckpt / "text_encoder" / "adapter_model.bin").write_bytes(pickle.dumps({}))
    with pytest.raises(UnsafeCheckpointError, match=r"module 'text_encoder': .*config.json names the weight file "
                                                     r"'adapter_model.bin' \(transformers_weights\), which is not a "
                                                     r"safetensors file"):
        loader.load_modules(check_model("pixart_sigma").spec, ckpt)
    assert torch_load_calls == []


@pytest.mark.parametrize("content", [b"", pickle.dumps({"a": 1}), b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!"])
def test_a_weights_file_that_is_not_safetensors_is_refused_by_name(ckpt, content, torch_load_calls):
    weights = ckpt / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(content)
    with pytest.raises(LoadError, match=r"module 'vae': .*diffusion_pytorch_model.safetensors is not a safetensors "
                                        r"file \("):
        loader.load_modules(check_model("pixart_sigma").spec, ckpt)
    assert torch_load_calls == []


def test_a_git_lfs_pointer_in_place_of_weights_says_so(ckpt):
    weights = ckpt / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 1234\n")
    with pytest.raises(LoadError, match=r"diffusion_pytorch_model.safetensors is not a safetensors file \(a Git LFS "
                                        r"pointer, not the file: run `git lfs pull` in the checkpoint\)"):
        loader.load_modules(check_model("pixart_sigma").spec, ckpt)


def test_pickle_beside_safetensors_that_nothing_reads_still_loads(ckpt):
    """A repo that ships both formats (pytorch_model.bin and its index beside the safetensors) loads the
    safetensors: with use_safetensors the libraries never read the pickle files."""
    (ckpt / "text_encoder" / "pytorch_model.bin").write_bytes(pickle.dumps({}))
    (ckpt / "text_encoder" / "pytorch_model.bin.index.json").write_text(
        json.dumps({"weight_map": {"a": "pytorch_model.bin"}}))
    modules = loader.load_modules(check_model("pixart_sigma").spec, ckpt)
    assert type(modules["text_encoder"]).__name__ == "T5EncoderModel"


def test_allow_pickle_needs_a_torch_without_the_weights_only_bypass(ckpt, monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.5.1+cpu")
    with pytest.raises(UnsafeCheckpointError, match=r"allow_pickle=true needs torch 2.6 or newer \(installed: "
                                                    r"2.5.1\+cpu\).*CVE-2025-32434"):
        loader.load_modules(check_model("pixart_sigma").spec, ckpt, allow_pickle=True)


def test_pyproject_requires_the_fixed_torch():
    from conftest import REPO

    assert '"torch>=2.6"' in (REPO / "pyproject.toml").read_text()


# 2. image formats -------------------------------------------------------------------------------
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nnewpath 0 0 moveto 8 8 lineto stroke\nshowpage\n%%EOF\n"
PS = b"%!PS-Adobe-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n%%EOF\n"
PDF = b"%PDF-1.4\n1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"


@pytest.fixture
def stub_gs(tmp_path):
    """A `gs` on PATH that only records that it ran."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    marker = tmp_path / "gs-ran"
    gs = bin_dir / "gs"
    gs.write_text(f"#!/bin/sh\necho \"$@\" >> '{marker}'\necho 10.0\n")
    gs.chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}, marker


@pytest.mark.parametrize("content", [EPS, PS, PDF], ids=["eps", "ps", "pdf"])
def test_an_image_in_a_format_that_runs_a_program_is_refused(tmp_path, stub_gs, content):
    env, marker = stub_gs
    image = tmp_path / "x.png"
    image.write_bytes(content)
    r = run("generate", "model=qwen_image_edit", f"image={image}", "prompt=a cat", f"hydra.run.dir={tmp_path / 'run'}",
            env=env)
    clean_exit_2(r, f"image: cannot open '{image}' as an image: it is not in one of the formats diffstage reads "
                    "(PNG, JPEG, WebP, BMP, TIFF, GIF)")
    assert not marker.exists(), marker.read_text()


def test_the_allowed_formats_open_and_others_are_refused_from_python(tmp_path):
    from PIL import Image

    from diffstage.errors import RequestError
    from diffstage.images import open_image

    picture = Image.new("RGB", (8, 8), (10, 200, 30))
    for fmt, ext in (("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp"), ("BMP", "bmp"), ("TIFF", "tif"),
                     ("GIF", "gif")):
        path = tmp_path / f"x.{ext}"
        picture.save(path, format=fmt)
        assert open_image(str(path)).size == (8, 8)
    picture.save(tmp_path / "x.ppm", format="PPM")
    with pytest.raises(RequestError, match=r"formats diffstage reads \(PNG, JPEG, WebP, BMP, TIFF, GIF\)"):
        open_image(str(tmp_path / "x.ppm"))


# 3. diffusers_auto runs only pipeline classes -------------------------------------------------
@pytest.mark.parametrize("name", ["is_torch_available", "UNet2DConditionModel", "FluxTransformer2DModel"])
def test_a_class_name_that_is_no_pipeline_is_refused_before_any_weight_loads(ckpt, name, monkeypatch):
    index = json.loads((ckpt / "model_index.json").read_text())
    (ckpt / "model_index.json").write_text(json.dumps({**index, "_class_name": name}))

    def no_loading(*args, **kwargs):
        raise AssertionError("load_modules was called")

    monkeypatch.setattr(loader, "load_modules", no_loading)
    with pytest.raises(LoadError, match=rf"model_index.json of '.*' names _class_name '{name}', which is not a "
                                        r"Diffusers pipeline \(a subclass of diffusers.DiffusionPipeline\); refused"):
        build_pipeline("diffusers_auto", model_path=ckpt)


def test_a_class_name_that_is_no_pipeline_exits_2_from_the_cli(ckpt, tmp_path):
    index = json.loads((ckpt / "model_index.json").read_text())
    (ckpt / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxTransformer2DModel"}))
    r = run("generate", "model=diffusers_auto", f"model_path={ckpt}", f"hydra.run.dir={tmp_path / 'run'}", *SMALL)
    clean_exit_2(r, "names _class_name 'FluxTransformer2DModel', which is not a Diffusers pipeline")
    assert "loaded" not in r.stderr


# 9. diffusers_auto checks for NaN ---------------------------------------------------------------
@pytest.fixture
def auto_yaml(tmp_path):
    """diffusers_auto without PixArt's resolution bins (the tiny transformer's size has none)."""
    path = tmp_path / "auto.yaml"
    path.write_text("extends: diffusers_auto\nname: auto_no_binning\nstages:\n"
                    "  - {_target_: diffstage.stages.InputValidationStage, multiple_of: 8}\n"
                    "  - {_target_: diffstage.stages.DiffusersPipelineStage, "
                    "call_kwargs: {use_resolution_binning: false}}\n")
    return path


def test_a_vae_scaling_factor_of_zero_is_refused_under_diffusers_auto(ckpt, auto_yaml, tmp_path):
    config_file = ckpt / "vae" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "scaling_factor": 0}))
    r = run("generate", f"model={auto_yaml}", f"model_path={ckpt}", f"hydra.run.dir={tmp_path / 'run'}", *SMALL)
    clean_exit_2(r, "the VAE decoded NaN or infinite values; check the VAE's config.json (scaling_factor, shift_factor)")
    assert not list(tmp_path.rglob("*.png"))


def test_nan_latents_under_diffusers_auto_name_the_step(ckpt, auto_yaml):
    pipe = build_pipeline(str(auto_yaml), model_path=ckpt, overrides=SMALL)
    transformer = pipe.modules["transformer"]
    handle = transformer.register_forward_hook(lambda m, args, out: (out[0] * float("nan"),) + tuple(out[1:]))
    try:
        with pytest.raises(DiffstageError, match=r"the latents became NaN or infinite at step 1 of 2"):
            pipe("a red fox", seed=0)
    finally:
        handle.remove()



def test_diffusers_auto_images_are_the_pipelines_own(ckpt, auto_yaml):
    """The fallback asks its pipeline for arrays (to check them) and converts them to PIL as Diffusers does."""
    import numpy as np
    from diffusers import PixArtSigmaPipeline

    ref = PixArtSigmaPipeline.from_pretrained(ckpt, torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    common = dict(height=32, width=32, num_inference_steps=2, max_sequence_length=16)
    expected = ref("a red fox", generator=torch.Generator("cpu").manual_seed(5), use_resolution_binning=False,
                   **common).images
    ours = build_pipeline(str(auto_yaml), model_path=ckpt)("a red fox", seed=5, **common).images
    assert [im.mode for im in ours] == [im.mode for im in expected]
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(ours, expected, strict=True))


# 8. sizes and folders of a checkpoint ------------------------------------------------------------
def test_a_scheduler_with_absurd_train_timesteps_is_refused(ckpt):
    config_file = ckpt / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "num_train_timesteps": 200000000}))
    with pytest.raises(LoadError, match=r"scheduler_config.json: num_train_timesteps is 200000000; at most 100000"):
        loader.load_modules(check_model("pixart_sigma").spec, ckpt)


@pytest.mark.parametrize("where", ["component", "nested"])
def test_a_folder_linked_outside_the_checkpoint_is_refused_before_walking_it(ckpt, tmp_path, where):
    outside = tmp_path / "outside"
    outside.mkdir()
    os.mkfifo(outside / "config.json")  # today's walk stops here with "not a regular file"
    if where == "component":
        shutil.rmtree(ckpt / "vae")
        (ckpt / "vae").symlink_to(outside, target_is_directory=True)
        link = ckpt / "vae"
    else:
        link = ckpt / "vae" / "extra"
        link.symlink_to(outside, target_is_directory=True)
    with pytest.raises(LoadError, match=rf"{link} is a link to the folder '{outside}', which is outside the "
                                        r"checkpoint; refused"):
        loader.load_modules(check_model("pixart_sigma").spec, ckpt)


def test_a_native_module_folder_linked_outside_is_refused_before_its_config_is_read(tiny_flux_dev, tmp_path):
    """A native model reads its config.json to choose runtime options: the link is refused before that."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_flux_dev, ckpt)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "config.json").write_text("{not json")
    shutil.rmtree(ckpt / "transformer")
    (ckpt / "transformer").symlink_to(outside, target_is_directory=True)
    loader.clear_cache()
    with pytest.raises(LoadError, match=r"transformer is a link to the folder '.*outside', which is outside the "
                                        r"checkpoint; refused"):
        loader.load_modules(check_model("flux").spec, ckpt, execution={"attention": "sdpa", "matmul_dtype": "auto"})


def test_a_component_folder_with_too_many_files_is_refused(ckpt, monkeypatch):
    monkeypatch.setattr(checkpoint_files, "MAX_FOLDER_ENTRIES", 50)
    for i in range(60):
        (ckpt / "vae" / f"f{i}.txt").write_text("x")
    with pytest.raises(LoadError, match=r"vae holds more than 50 files and folders"):
        loader.load_modules(check_model("pixart_sigma").spec, ckpt)


def test_files_linked_to_blobs_outside_still_load(ckpt, tmp_path):
    """The Hugging Face cache links each file of a snapshot to a blob outside the folder."""
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    for file in list((ckpt / "vae").iterdir()):
        blob = blobs / f"vae-{file.name}"
        shutil.move(file, blob)
        file.symlink_to(blob)
    modules = loader.load_modules(check_model("pixart_sigma").spec, ckpt)
    assert type(modules["vae"]).__name__ == "AutoencoderKL"
