"""pipeline_config.checkpoint_settings: a pipeline's own config in model_index.json (force_zeros_for_empty_prompt
and the like) reaches the callbacks' `settings`, per checkpoint, with the YAML's value as the default."""
import json
import shutil

import pytest

from conftest import problems_of
from diffstage import PipelineBuilder
from diffstage.models_dir import model_yaml

DIGITS = model_yaml("digits").parent.parent / "models" / "digits" / "checkpoint"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The digits checkpoint three times: model_index.json with the value 1, 0, and without it."""
    out = {}
    for name, value in (("on", 1), ("off", 0), ("unset", None)):
        folder = tmp_path_factory.mktemp(name) / "ckpt"
        shutil.copytree(DIGITS, folder)
        index = json.loads((folder / "model_index.json").read_text())
        if value is not None:
            index["zeros_for_empty"] = value
        (folder / "model_index.json").write_text(json.dumps(index))
        out[name] = folder
    return out


@pytest.mark.parametrize("which, expected", [("on", 1), ("off", 0), ("unset", 7)])
def test_model_index_value_reaches_every_stage(checkpoints, which, expected):
    b = PipelineBuilder.from_yaml("digits")
    b.data["pipeline_config"]["checkpoint_settings"] = {"zeros_for_empty": 7}  # the value without one
    pipe = b.build(model_path=checkpoints[which])
    # every stage: those made before weights load (input validation) and those made with the modules
    assert [s.settings["zeros_for_empty"] for s in pipe.stages] == [expected] * len(pipe.stages)
    assert pipe.stages[0].settings.zeros_for_empty == expected


@pytest.mark.parametrize("settings, message", [
    ({"settings": {"flag": 1}, "checkpoint_settings": {"flag": 0}},
     "'flag' is in both settings and checkpoint_settings: keep it in checkpoint_settings (its value there is the "
     "default for checkpoints without one)"),
    ({"checkpoint_settings": {"_class_name": "x"}},
     "checkpoint_settings: '_class_name' is not a model_index.json config key (a name without a leading "
     "underscore)"),
])
def test_checkpoint_settings_are_checked(flux_yaml_variant, settings, message):
    import yaml

    text = "pipeline_config:\n" + "".join(f"  {k}: {yaml.safe_dump(v, default_flow_style=True).strip()}\n"
                                          for k, v in settings.items())
    path = flux_yaml_variant(("pipeline_config:\n", text))
    problems = problems_of(path)
    assert len(problems) == 1 and message in problems[0].message and problems[0].key == "pipeline_config", problems


def test_a_value_of_another_kind_is_refused_before_weights_load(checkpoints, tmp_path):
    import shutil as sh

    from diffstage import DiffstageError

    folder = tmp_path / "ckpt"
    sh.copytree(checkpoints["unset"], folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "zeros_for_empty": "yes"}))
    b = PipelineBuilder.from_yaml("digits")
    b.data["pipeline_config"]["checkpoint_settings"] = {"zeros_for_empty": True}
    with pytest.raises(DiffstageError, match=rf"model_index.json of '{folder}' gives zeros_for_empty = 'yes', but "
                                             rf"model 'digits' expects a bool there \(checkpoint_settings."
                                             rf"zeros_for_empty: True\)"):
        b.build(model_path=folder)
    b.data["pipeline_config"]["checkpoint_settings"] = {"zeros_for_empty": 1.5}  # numbers: int or float alike
    (folder / "model_index.json").write_text(json.dumps({**index, "zeros_for_empty": 2}))
    assert b.build(model_path=folder).stages[0].settings["zeros_for_empty"] == 2
