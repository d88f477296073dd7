"""PipelineBuilder: edit a model from Python, check it like a YAML, build it, write it back as YAML."""
import numpy as np
import pytest
import yaml

from diffstage import DiffstageError, PipelineBuilder, SpecError, build_pipeline, check_model
from diffstage.spec import ModelSpec
from diffstage.stages import DecodingStage, DenoisingStage, InputValidationStage

DIGITS_STAGES = ["input_validation", "text_encoding", "latent_preparation", "timestep_preparation", "denoising",
                 "decoding"]


def combine_twice(cond, uncond, scale):
    """A module-level callback: it has an import path, so it can be written to YAML."""
    return uncond + scale * (cond - uncond)


class Passthrough(DecodingStage):
    """A user stage class (module level)."""


def test_stage_names_default_to_the_class_in_snake_case():
    b = PipelineBuilder.from_yaml("digits")
    assert b.stage_names() == DIGITS_STAGES
    b.insert("decoding", "diffstage.stages.DecodingStage")  # a second of one class gets _2
    assert b.stage_names()[-2:] == ["decoding", "decoding_2"]
    assert b.stage(-1)["_target_"] == "diffstage.stages.DecodingStage" and b.stage(0) == b.stage("input_validation")


def test_round_trip_through_yaml(tmp_path):
    b = PipelineBuilder.from_yaml("digits")
    b.set_args("denoising", cfg_batch=False).set_sampling(num_inference_steps=4).set_settings(eta=0.0)
    b.set_callback("denoising", "combine_cfg", combine_twice)
    path = b.to_yaml(tmp_path / "mine.yaml")
    assert "cfg_batch: false" in path.read_text()
    again = PipelineBuilder.from_yaml(path, allowlist=["test_pipeline_builder"])
    assert again.to_dict() == b.to_dict()  # an equal spec
    checked = check_model(path, allowlist=["test_pipeline_builder"])  # the YAML validates (its callback's module)
    assert checked.spec == ModelSpec.model_validate(b.to_dict())
    assert "allowlist=[test_pipeline_builder]" in path.read_text()  # the header says what validate needs
    assert again.check() == []
    assert [p.message for p in PipelineBuilder.from_yaml(path).check()] == [  # the allowlist still applies to YAML
        "'test_pipeline_builder.combine_twice' is outside the import allowlist ['diffstage.', 'diffusers.', "
        "'transformers.', 'torch.']; refused without importing it"]


def test_from_yaml_follows_extends_and_writes_a_whole_file(tmp_path):
    text = PipelineBuilder.from_yaml("digits").to_yaml(tmp_path / "digits.yaml").read_text()
    data = yaml.safe_load(text)
    assert "extends" not in data and data["name"] == "digits" and len(data["stages"]) == 6


def test_removing_the_latents_stage_names_who_reads_them():
    b = PipelineBuilder.from_yaml("digits").remove("latent_preparation")
    problems = b.check()
    assert any(p.key == "stages[2] (timestep_preparation)" and "reads 'latents' but no earlier stage writes it"
               in p.message for p in problems)
    assert all(p.file == "<PipelineBuilder 'digits' from digits.yaml>" and p.line is None for p in problems)
    with pytest.raises(SpecError, match="reads 'latents' but no earlier stage writes it"):
        b.build()


def test_a_misspelt_argument_gets_did_you_mean():
    problems = PipelineBuilder.from_yaml("digits").set_args("denoising", cfg_bach=False).check()
    assert [str(p) for p in problems] == [
        "<PipelineBuilder 'digits' from digits.yaml>: stages[4] (denoising).cfg_bach: [DenoisingStage] unknown "
        "argument 'cfg_bach' (did you mean 'cfg_batch'?)"]


def test_unknown_stage_names_and_indexes_are_errors():
    b = PipelineBuilder.from_yaml("digits")
    with pytest.raises(DiffstageError, match=r"no stage named 'denoisng' \(did you mean 'denoising'\?\)"):
        b.remove("denoisng")
    with pytest.raises(DiffstageError, match="no stage at index 9: the pipeline has 6 stages"):
        b.set_args(9, x=1)
    with pytest.raises(DiffstageError, match="two stages would be named 'decoding'"):
        b.insert(0, InputValidationStage, name="decoding")
    with pytest.raises(DiffstageError, match="a stage is a PipelineStage class, an instance of one or a dotted path"):
        b.insert(0, 42)


def test_builder_digits_is_bit_identical_to_yaml_digits():
    kw = dict(seed=5, output_type="np")
    ours = PipelineBuilder.from_yaml("digits").build()("a handwritten digit four", **kw).images
    ref = build_pipeline("digits", overrides=["reuse.enabled=false"])("a handwritten digit four", **kw).images
    assert np.array_equal(ours, ref)


def test_edits_with_python_objects_build_and_run():
    """A stage class, a stage instance and a lambda callback: used as they are, no allowlist needed."""
    calls = []

    def combine(cond, uncond, scale):
        calls.append(scale)
        return uncond + scale * (cond - uncond)

    b = PipelineBuilder.from_yaml("digits")
    b.replace("decoding", Passthrough)
    b.replace("denoising", DenoisingStage(None, None, conditioning=["prompt_embeds", "pooled_prompt_embeds"],
                                          cfg_batch=False, progress=False))
    b.set_callback("denoising", "combine_cfg", combine)
    assert b.check() == []
    assert b.stage("denoising")["cfg_batch"] is False and "transformer" not in b.stage("denoising")
    pipe = b.build(overrides=["sampling.num_inference_steps=2"])
    out = pipe("a handwritten digit four", seed=5, output_type="np")
    assert type(pipe.stages[-1]) is Passthrough and calls == [6.0, 6.0]
    ref = PipelineBuilder.from_yaml("digits").set_args("denoising", cfg_batch=False)  # the same, as YAML data
    ref = ref.build(overrides=["sampling.num_inference_steps=2"])
    assert np.array_equal(out.images, ref("a handwritten digit four", seed=5, output_type="np").images)


def test_a_function_without_import_path_cannot_be_written(tmp_path):
    b = PipelineBuilder.from_yaml("digits").set_callback("denoising", "combine_cfg", lambda c, u, s: u + s * (c - u))
    with pytest.raises(DiffstageError, match=r"cannot write this pipeline as YAML.*\n  - callback "
                                             r"denoising.combine_cfg: .*<lambda>.* has no import path"):
        b.to_yaml(tmp_path / "x.yaml")
    assert not (tmp_path / "x.yaml").exists()


def test_to_yaml_does_not_overwrite(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("mine")
    with pytest.raises(DiffstageError, match="exists; diffstage never overwrites a file"):
        PipelineBuilder.from_yaml("digits").to_yaml(path)
    assert path.read_text() == "mine"


def test_an_empty_builder_is_checked_like_a_yaml():
    b = PipelineBuilder("mini", "FluxPipeline")
    assert [str(p) for p in b.check()] == [
        "<PipelineBuilder 'mini'>: stages: List should have at least 1 item after validation, not 0 (got [])",
        "<PipelineBuilder 'mini'>: stages: no stage writes 'output', so the pipeline would produce nothing (end the "
        "pipeline with a stage that writes it, e.g. DecodingStage)"]
    b.set_module("vae").append(DecodingStage)
    assert [str(p) for p in b.check()] == [
        "<PipelineBuilder 'mini'>: stages[0] (decoding): [DecodingStage] reads 'latents' but no earlier stage writes "
        "it and the request does not supply it (add a stage that writes it before stages[0], e.g. "
        "LatentPreparationStage)"]


def test_set_module_and_callbacks_round_trip():
    b = PipelineBuilder.from_yaml("digits")
    b.set_module("vae", "diffusers.AutoencoderKL", dtype="float32")
    assert b.to_dict()["modules"]["vae"] == {"_target_": "diffusers.AutoencoderKL", "dtype": "float32"}
    b.set_callback("denoising", "combine_cfg", "diffstage.models.qwen_image.callbacks.combine_cfg")
    assert b.check() == []
    b.set_callback("denoising", "combine_cfg", None)
    assert "combine_cfg" not in b.to_dict()["pipeline_config"]["callbacks"]["denoising"]
    with pytest.raises(DiffstageError, match=r"no module 'vea' \(did you mean 'vae'\?\)"):
        b.remove_module("vea")


def test_a_named_stage_round_trips_and_the_schema_accepts_it(tmp_path):
    import jsonschema

    from diffstage.schema import model_schema

    b = PipelineBuilder.from_yaml("digits").insert("decoding", Passthrough, name="first_decoding")
    assert b.stage_names()[-2:] == ["first_decoding", "decoding"]
    path = b.to_yaml(tmp_path / "named.yaml")
    assert PipelineBuilder.from_yaml(path).stage_names() == b.stage_names()
    data = yaml.safe_load(path.read_text())
    assert data["stages"][5]["_name_"] == "first_decoding"
    jsonschema.validate(data, model_schema())
    data["stages"][5]["_name_"] = "not a name"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(data, model_schema())
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    assert "a stage name must be a Python identifier, got 'not a name'" in str(
        pytest.raises(SpecError, check_model, bad, allowlist=["test_pipeline_builder"]).value)


def test_edit_arguments_are_checked():
    b = PipelineBuilder.from_yaml("digits")
    with pytest.raises(DiffstageError, match="set_args cannot set '_target_'; use replace\\(\\) for another class"):
        b.set_args("decoding", _target_="x.Y")
    with pytest.raises(DiffstageError, match=r"set\(stages=...\): use the builder's methods for stages"):
        b.set(stages=[])
    with pytest.raises(DiffstageError, match="set_callback: the callback group must be an identifier, got 'de-noising'"):
        b.set_callback("de-noising", "mu", "diffstage.models.flux.callbacks.mu")
    with pytest.raises(DiffstageError, match="a callback must be callable or a dotted path, got 42"):
        b.set_callback("denoising", "combine_cfg", 42)
    with pytest.raises(DiffstageError, match="a stage name must be a Python identifier, got 'not a name'"):
        b.append(DecodingStage, name="not a name")
    assert b.stage_names() == DIGITS_STAGES  # nothing was changed by the refused edits
