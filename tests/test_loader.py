"""The loader: Diffusers-format directories, repo ids offline, safetensors-only, the module cache."""
import json
import shutil

import pytest
import torch

from diffstage import LoadError, UnsafeCheckpointError, build_pipeline, check_model
from diffstage import loader
from diffstage.session import default_session


def edited_copy(src, dst, file: str, edit) -> object:
    """A copy of checkpoint `src` at `dst` whose JSON `file` went through `edit(dict)`."""
    shutil.copytree(src, dst)
    data = json.loads((dst / file).read_text())
    edit(data)
    (dst / file).write_text(json.dumps(data))
    loader.clear_cache()
    return dst


@pytest.fixture
def flux_spec():
    return check_model("flux").spec


def test_loads_listed_modules_with_dtype(tiny_flux_dev, flux_spec):
    loader.clear_cache()
    modules = loader.load_modules(flux_spec, tiny_flux_dev, dtype="bfloat16")
    assert set(modules) == set(flux_spec.modules)
    assert type(modules["transformer"]).__name__ == "FluxTransformer"  # native (flux.yaml's _target_)
    assert modules["transformer"].dtype == torch.bfloat16
    assert not modules["transformer"].training
    assert type(modules["scheduler"]).__name__ == "FlowMatchEulerDiscreteScheduler"


def test_cache_loads_nothing_the_second_time(tiny_flux_dev):
    loader.clear_cache()
    modules = default_session().modules
    before = modules.load_count
    first = build_pipeline("flux", model_path=tiny_flux_dev)
    assert modules.load_count - before == 7
    second = build_pipeline("flux", model_path=tiny_flux_dev)
    assert modules.load_count - before == 7  # nothing new loaded
    assert second.modules["transformer"] is first.modules["transformer"]
    # a different dtype is a different cache entry (only torch modules reload)
    build_pipeline("flux", model_path=tiny_flux_dev, overrides=["runtime.dtype=bfloat16"])
    assert modules.load_count - before == 7 + 4
    # other execution settings reconfigure a separate copy of the native transformer only
    other = build_pipeline("flux", model_path=tiny_flux_dev, overrides=["attention=reference"])
    assert modules.load_count - before == 7 + 4 + 1
    assert other.modules["transformer"].attention_backend == "reference"
    assert first.modules["transformer"].attention_backend == "sdpa"


def test_pickle_checkpoint_refused_unless_allowed(tiny_flux_dev, tmp_path, flux_spec):
    ckpt = tmp_path / "pickled"
    shutil.copytree(tiny_flux_dev, ckpt)
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(ckpt / "vae")
    (ckpt / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    vae.save_pretrained(ckpt / "vae", safe_serialization=False)
    assert (ckpt / "vae" / "diffusion_pytorch_model.bin").exists()
    loader.clear_cache()
    with pytest.raises(UnsafeCheckpointError) as e:
        loader.load_modules(flux_spec, ckpt)
    assert "module 'vae'" in str(e.value) and "diffusion_pytorch_model.bin is a pickle checkpoint" in str(e.value)
    assert "allow_pickle=true" in str(e.value)
    modules = loader.load_modules(flux_spec, ckpt, allow_pickle=True)
    assert type(modules["vae"]).__name__ == "AutoencoderKL"


def test_bad_paths(tmp_path, flux_spec):
    with pytest.raises(LoadError, match="does not exist"):
        loader.load_modules(flux_spec, tmp_path / "missing" / "dir")
    with pytest.raises(LoadError, match="has no model_index.json"):
        loader.load_modules(flux_spec, tmp_path)


def test_repo_id_offline_without_cache(flux_spec, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(LoadError, match="'someone/not-cached' is not a local directory, and getting it as a Hugging Face repo id failed"):
        loader.load_modules(flux_spec, "someone/not-cached")


def test_wrong_pipeline_class(tiny_flux_dev, tmp_path, flux_spec):
    ckpt = edited_copy(tiny_flux_dev, tmp_path / "other", "model_index.json",
                       lambda index: index.update(_class_name="StableDiffusionPipeline"))
    with pytest.raises(LoadError, match="is a 'StableDiffusionPipeline', but model 'flux' serves FluxPipeline"):
        loader.load_modules(flux_spec, ckpt)


def test_module_missing_from_index(tiny_flux_dev, tmp_path, flux_spec):
    ckpt = edited_copy(tiny_flux_dev, tmp_path / "noindex", "model_index.json", lambda index: index.pop("vae"))
    with pytest.raises(LoadError, match="module 'vae' is not in model_index.json; give its class with `_target_`"):
        loader.load_modules(flux_spec, ckpt)


def test_model_index_classes_go_through_the_allowlist(tiny_flux_dev, tmp_path, flux_spec):
    from diffstage import DisallowedPathError

    ckpt = edited_copy(tiny_flux_dev, tmp_path / "evil", "model_index.json",
                       lambda index: index.update(vae=["os", "system"]))
    with pytest.raises(DisallowedPathError, match="model_index.json names 'os.system' for module 'vae', which is outside"):
        loader.load_modules(flux_spec, ckpt)


def test_corrupt_weights_are_a_load_error(tiny_flux_dev, tmp_path, flux_spec):
    # weights were saved for block_out_channels (8, 16)
    ckpt = edited_copy(tiny_flux_dev, tmp_path / "corrupt", "vae/config.json",
                       lambda config: config.update(block_out_channels=[16, 32]))
    with pytest.raises(LoadError, match=r"module 'vae': loading AutoencoderKL from '.*vae' failed: \w+"):
        loader.load_modules(flux_spec, ckpt)


def test_schedulers_are_not_shared_between_pipelines(tiny_flux_dev, flux_spec):
    a = loader.load_modules(flux_spec, tiny_flux_dev)
    b = loader.load_modules(flux_spec, tiny_flux_dev)
    assert a["transformer"] is b["transformer"] and a["scheduler"] is not b["scheduler"]


def test_checkpoint_cannot_name_a_pipeline_class(tiny_flux_dev, tmp_path, flux_spec):
    """A nested pipeline would load what it likes (and ignore the safetensors rule)."""
    ckpt = edited_copy(tiny_flux_dev, tmp_path / "nested", "model_index.json",
                       lambda index: index.update(scheduler=["diffusers", "DiffusionPipeline"]))
    with pytest.raises(LoadError, match="module 'scheduler': model_index.json names 'diffusers.DiffusionPipeline': "
                                        ".* cannot load a module"):
        loader.load_modules(flux_spec, ckpt)


def test_pickle_in_a_nested_folder_is_refused(tiny_flux_dev, tmp_path, flux_spec):
    ckpt = tmp_path / "nested_pickle"
    shutil.copytree(tiny_flux_dev, ckpt)
    (ckpt / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    (ckpt / "vae" / "sub").mkdir()
    (ckpt / "vae" / "sub" / "weights.bin").write_bytes(b"not really a pickle")
    loader.clear_cache()
    with pytest.raises(UnsafeCheckpointError, match="sub/weights.bin is a pickle checkpoint"):
        loader.load_modules(flux_spec, ckpt)
