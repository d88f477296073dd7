"""Error paths whose texts are part of the interface and are not covered elsewhere."""
import sys

import pytest
import torch

from diffstage import DiffstageError, LoadError, build_pipeline, check_model
from diffstage import loader
from diffstage.resolve import resolve
from diffstage.stages import DecodingStage
from diffstage.torch_utils import parse_device, parse_dtype

from conftest import line_of, problems_of



def test_dtype_and_device_errors():
    with pytest.raises(DiffstageError, match=r"^unknown dtype 'int8'; use one of: float32, bfloat16, float16$"):
        parse_dtype("int8")
    with pytest.raises(DiffstageError, match=r"^unknown device 'gpu0'; use cpu, cuda, cuda:N or auto$"):
        parse_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(DiffstageError, match="requested but CUDA is not available; use runtime=cpu"):
            parse_device("cuda")


def test_unbound_callback():
    with pytest.raises(DiffstageError, match=r"^DecodingStage: callback 'unpack' is not bound; call "
                                             r"stage.bind\(callbacks, settings\) first"):
        DecodingStage(vae=None).callback("unpack")


def test_broken_module_import_is_reported(tmp_path, monkeypatch):
    (tmp_path / "broken_cb.py").write_text("def f(:\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(DiffstageError, match=r"^importing 'broken_cb' for 'broken_cb.f' failed: SyntaxError"):
        resolve("broken_cb.f", ("broken_cb",))


def test_model_yaml_is_a_directory(tmp_path):
    with pytest.raises(DiffstageError, match="is a directory; give the .yaml file inside it"):
        check_model(str(tmp_path) + "/")


def test_extends_must_be_a_name(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("name: x\nextends: 3\n")
    (p,) = problems_of(path)
    assert (p.message, p.line) == ("`extends` must name a model or a YAML path", 2)


def test_missing_module_folder(tiny_flux_dev, tmp_path):
    import shutil

    ckpt = tmp_path / "novae"
    shutil.copytree(tiny_flux_dev, ckpt)
    shutil.rmtree(ckpt / "vae")
    loader.clear_cache()
    with pytest.raises(LoadError, match=r"module 'vae': folder '.*novae/vae' does not exist in the checkpoint"):
        loader.load_modules(check_model("flux").spec, ckpt)


@pytest.mark.parametrize("stage_yaml, key, message", [
    ("  - _target_: diffstage.stages.DecodingStage\n    vae: [1]\n", "stages[5].vae",
     "argument 'vae' must name a module (a string), got [1]"),
    ("  - vae: vae\n", "stages[5]", "stage has no `_target_` (the dotted path of its class)"),
])
def test_stage_entry_errors(flux_yaml_variant, stage_yaml, key, message):
    path = flux_yaml_variant(("  - _target_: diffstage.stages.DecodingStage\n", stage_yaml))
    problems = [p for p in problems_of(path) if p.key == key]
    assert [p.message for p in problems] == [message]


def test_custom_stage_contract_errors(flux_yaml_variant, tmp_path, monkeypatch):
    (tmp_path / "odd_stages.py").write_text(
        "from diffstage.stages import DecodingStage\n"
        "class NeedsThing(DecodingStage):\n"
        "    optional_reads = ('latentz',)\n"
        "    def __init__(self, vae, thing: int):\n"
        "        super().__init__(vae)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = flux_yaml_variant(("diffstage.stages.DecodingStage", "odd_stages.NeedsThing"),
                             ("callbacks.unpack", "callbacks.unpack\n      denormalize: diffstage.resolve.MAX_PATH"))
    messages = {p.message: p for p in problems_of(path, allowlist=["odd_stages"])}
    assert messages["missing required argument 'thing'"].stage == "NeedsThing"
    assert messages["reads 'latentz', which is not a Req field"].hint == "did you mean 'latents'?"
    assert messages["'diffstage.resolve.MAX_PATH' is not callable"].line == line_of(path, "denormalize: diffstage")


def test_stage_init_failure_points_at_the_stage(flux_yaml_variant, tmp_path, monkeypatch, tiny_flux_dev):
    (tmp_path / "picky_stages.py").write_text(
        "from diffstage.stages import DecodingStage\n"
        "class Picky(DecodingStage):\n"
        "    def __init__(self, vae, level: int = 1):\n"
        "        if level > 2:\n"
        "            raise ValueError('level must be at most 2')\n"
        "        super().__init__(vae)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = flux_yaml_variant(("  - _target_: diffstage.stages.DecodingStage\n",
                              "  - _target_: picky_stages.Picky\n    level: 3\n"))
    with pytest.raises(DiffstageError) as e:
        build_pipeline(str(path), model_path=tiny_flux_dev, overrides=["allowlist=[picky_stages]"])
    assert str(e.value) == (f"{path}:{line_of(path, 'picky_stages.Picky')}: stages[5]: Picky could not be created: "
                            "ValueError: level must be at most 2")
    sys.modules.pop("picky_stages", None)
