"""Review of the issue 18 change: holes left by it (a PEFT adapter's pickle weights, a bound-method callback
of another object keyed by its function alone)."""
import json
import pickle

import pytest
import torch

from diffstage import UnsafeCheckpointError, check_model, loader
from test_hardening_security import ckpt, pixart_ckpt  # noqa: F401 - fixtures: a private copy of tiny PixArt


def test_a_peft_adapter_with_pickle_weights_is_refused(ckpt, monkeypatch):
    """With PEFT installed, Transformers loads the adapter that adapter_config.json announces beside a model,
    from adapter_model.bin with torch.load when there is no adapter_model.safetensors."""
    calls = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(a) or real(*a, **k))
    folder = ckpt / "text_encoder"
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": "x"}))
    (folder / "adapter_model.bin").write_bytes(pickle.dumps({}))
    with pytest.raises(UnsafeCheckpointError, match=r"module 'text_encoder': .*adapter_config.json makes Transformers "
                                                    r"\(with PEFT installed\) load the adapter weights "
                                                    r"'adapter_model.bin', which is not a safetensors file"):
        loader.load_modules(check_model("pixart_sigma").spec, ckpt)
    assert calls == []


def test_a_peft_adapter_in_safetensors_is_not_refused_for_pickle(ckpt):
    from safetensors.torch import save_file

    folder = ckpt / "text_encoder"
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": "x"}))
    (folder / "adapter_model.bin").write_bytes(pickle.dumps({}))  # not read: the safetensors file wins
    save_file({"a": torch.zeros(1)}, folder / "adapter_model.safetensors")
    modules = loader.load_modules(check_model("pixart_sigma").spec, ckpt)
    assert type(modules["text_encoder"]).__name__ == "T5EncoderModel"
    # with peft installed, Transformers would apply the folder's adapter, or load the base model it names ("x",
    # from the Hub): a checkpoint does not choose what loads
    assert not getattr(modules["text_encoder"], "_hf_peft_config_loaded", False)


def test_bound_method_callbacks_of_two_objects_get_different_keys():
    """A callback that is a method of an object depends on that object: two objects' methods share their
    function, so keying by the function alone served the second the first's outputs."""
    from diffstage import build_pipeline
    from diffstage.callbacks import reads

    class Scale:
        def __init__(self, factor):
            self.factor = factor

        @reads()
        def combine(self, outputs, req, settings, negative):
            return {"prompt_embeds": outputs["prompt_embeds"] * self.factor}

    pipe = build_pipeline("digits")
    stage = pipe.stages[1]
    req = pipe.make_request(prompt="a handwritten digit four", seed=0)
    req = pipe.stages[0](req)
    keys = []
    for factor in (1.0, 3.0):
        stage.bind({"combine": Scale(factor).combine}, dict(stage.settings))
        keys.append(pipe.reuse.signature(stage, req, pipe.module_keys))
    assert None not in keys and keys[0] != keys[1]


def test_the_abstract_diffusion_pipeline_base_is_refused_before_any_weight_loads(ckpt, monkeypatch):
    """DiffusionPipeline itself passes a subclass check but has no __call__: refused from model_index.json,
    not with an AttributeError once every module has loaded."""
    from diffstage import LoadError, build_pipeline

    index = json.loads((ckpt / "model_index.json").read_text())
    (ckpt / "model_index.json").write_text(json.dumps({**index, "_class_name": "DiffusionPipeline"}))

    def no_loading(*args, **kwargs):
        raise AssertionError("load_modules was called")

    monkeypatch.setattr(loader, "load_modules", no_loading)
    with pytest.raises(LoadError, match=r"names _class_name 'DiffusionPipeline', which is not a Diffusers pipeline"):
        build_pipeline("diffusers_auto", model_path=ckpt)


def test_a_prompt_that_names_a_file_is_a_string_not_the_files_contents(tmp_path, monkeypatch):
    """Only image fields name files: a prompt such as '/proc/kmsg' or a 200 MB file's path must not be read
    (it could block, or cost a 200 MB read on every call) just because a file has that name."""
    from diffstage import build_pipeline, reuse

    named = tmp_path / "a handwritten digit four"
    named.write_text("x")
    opened = []
    monkeypatch.setattr(reuse, "_file_digest", lambda path: opened.append(path) or "digest")
    pipe = build_pipeline("digits")
    req = pipe.make_request(prompt=str(named), seed=0)
    req = pipe.stages[0](req)
    assert pipe.reuse.signature(pipe.stages[1], req, pipe.module_keys) is not None
    assert opened == []
    image_field = reuse.fingerprint(str(named), files=True)  # an image field's path: its bytes
    assert opened == [str(named)] and image_field[0] == "file"


def test_an_image_fields_file_is_keyed_by_its_bytes_in_a_stage_signature(tmp_path):
    from PIL import Image

    from diffstage import FieldSpec, PipelineStage, Req
    from diffstage.reuse import ReuseCache

    class EncodeImage(PipelineStage):
        reads = ("image", "prompt")
        writes = ("prompt_embeds",)
        reusable = True

    stage = EncodeImage()
    stage.declared = EncodeImage.contract({})
    req_cls = Req.with_fields([FieldSpec("image", "request", type="image")])
    path = tmp_path / "in.bmp"
    keys = []
    for colour in ((10, 20, 30), (200, 20, 30)):
        Image.new("RGB", (8, 8), colour).save(path)
        keys.append(ReuseCache().signature(stage, req_cls(prompt=str(path), image=str(path)), {}))
    assert None not in keys and keys[0] != keys[1]


@pytest.mark.parametrize("content, reason", [
    (b"", "0 bytes, too short for a header: damaged, or another format under a safetensors name?"),
    (b"\xff" * 8 + b"{}", f"its header length {2 ** 64 - 1} does not fit its 10 bytes: damaged, or another format?"),
    (b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!", "its header is not a JSON object: damaged, or another format?"),
    (b"\x02\x00\x00\x00\x00\x00\x00\x00{}", None),
])
def test_each_safetensors_header_problem_says_what_is_wrong(tmp_path, content, reason):
    from diffstage.weight_files import safetensors_header_problem

    file = tmp_path / "w.safetensors"
    file.write_bytes(content)
    assert safetensors_header_problem(file) == reason


def test_a_rank_not_below_the_world_size_is_named(monkeypatch):
    from diffstage import DiffstageError
    from diffstage.distributed.state import launched_world

    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(DiffstageError, match=r"environment variable RANK='2': expected a whole number below "
                                             r"WORLD_SIZE=2 \(torchrun sets both\)"):
        launched_world()


def test_a_sheet_key_given_to_generate_gets_the_did_you_mean_not_hydras_append_advice(tmp_path):
    from test_cli import run

    r = run("generate", "seeds=3", f"hydra.run.dir={tmp_path / 'run'}")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "unknown key 'seeds' (did you mean 'seed'?)" in r.stderr and "To append" not in r.stderr, r.stderr
    assert not (tmp_path / "run").exists()
    from diffstage import DiffstageError, build_pipeline

    with pytest.raises(DiffstageError, match=r"unknown key 'prompts' \(did you mean 'prompt'\?\)"):
        build_pipeline("digits", overrides=["prompts=[a]"])
