"""`diffstage schema`: a JSON Schema of the model YAML format that editors can check files against."""
import json

import pytest
import yaml
from jsonschema import Draft202012Validator

from conftest import FLUX_YAML, REPO
from test_cli import run

from diffstage.schema import DIALECT, model_schema, model_schema_json, stage_arguments_schema
from diffstage.stages import STANDARD_STAGES, InputValidationStage

SHIPPED = sorted((REPO / "pipelines_yaml").glob("*.yaml"))


@pytest.fixture(scope="module")
def validator():
    r = run("schema")
    assert r.returncode == 0, r.stderr
    schema = json.loads(r.stdout)
    assert schema["$schema"] == DIALECT == Draft202012Validator.META_SCHEMA["$id"]
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def _errors(validator, data) -> list[str]:
    return sorted(e.message for e in validator.iter_errors(data))


def _flux():
    return yaml.safe_load(FLUX_YAML.read_text())


@pytest.mark.parametrize("yaml_file", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_yaml_validates(validator, yaml_file):
    assert _errors(validator, yaml.safe_load(yaml_file.read_text())) == []


def test_unknown_top_level_key_is_rejected(validator):
    data = _flux()
    data["stagse"] = data.pop("stages")
    errors = _errors(validator, data)
    assert "Additional properties are not allowed ('stagse' was unexpected)" in errors
    assert "'stages' is a required property" in errors


def test_misspelt_standard_stage_argument_is_rejected(validator):
    data = _flux()
    data["stages"][0]["multiple_off"] = 16
    assert _errors(validator, data) == ["Additional properties are not allowed ('multiple_off' was unexpected)"]
    data = _flux()
    data["stages"][0]["multiple_of"] = "16"  # strict, as the check is: a string is not an integer
    assert _errors(validator, data) == ["'16' is not of type 'integer'"]
    data = _flux()
    data["stages"][1]["encoders"][0]["max_lenght"] = 77  # nested argument models are checked too
    assert _errors(validator, data) == ["Additional properties are not allowed ('max_lenght' was unexpected)"]


def test_standard_stage_by_module_path_and_misspelt_stage_name(validator):
    data = _flux()
    data["stages"][0]["_target_"] = "diffstage.stages.input_validation.InputValidationStage"
    assert _errors(validator, data) == []
    data["stages"][0]["multiple_off"] = 16
    assert len(_errors(validator, data)) == 1
    data = _flux()
    data["stages"][0]["_target_"] = "diffstage.stages.InputValidationStag"
    assert _errors(validator, data) == [
        "'diffstage.stages.InputValidationStag' is not valid under any of the given schemas"]


def test_user_stage_takes_any_arguments(validator):
    data = _flux()
    data["stages"].insert(1, {"_target_": "my_pkg.MyStage", "anything": [1, {"nested": True}], "multiple_off": 16})
    assert _errors(validator, data) == []
    data["stages"][1] = {"anything": 1}  # but it needs a class
    assert _errors(validator, data) == ["'_target_' is a required property"]


def test_module_arguments_take_a_module_name(validator):
    data = _flux()
    data["stages"][4]["transformer"] = "transformer_2"
    assert _errors(validator, data) == []
    data["stages"][4]["transformer"] = 3
    assert _errors(validator, data) == ["3 is not of type 'string'"]


def test_partial_file_with_extends(validator):
    variant = yaml.safe_load((REPO / "pipelines_yaml" / "flux_schnell.yaml").read_text())
    assert "extends" in variant and "stages" not in variant and _errors(validator, variant) == []
    assert _errors(validator, {"extends": "flux", "sampling": {"height": 512}}) == []
    assert _errors(validator, {"extends": "flux", "stagse": []}) == [
        "Additional properties are not allowed ('stagse' was unexpected)"]
    assert _errors(validator, {"extends": "flux", "sampling": {"heigth": 512}}) == [
        "Additional properties are not allowed ('heigth' was unexpected)"]
    # without extends, the keys a complete model needs are required
    assert _errors(validator, {"name": "x", "sampling": {"height": 512}}) == [
        "'modules' is a required property", "'pipeline_name' is a required property",
        "'stages' is a required property", "'task' is a required property"]


def test_every_standard_stage_has_a_subschema():
    schema = model_schema()
    rules = schema["$defs"]["StageSpec"]["allOf"]
    assert len(rules) == len(STANDARD_STAGES)
    for cls in STANDARD_STAGES:
        sub = schema["$defs"][cls.__name__]
        assert f"diffstage.stages.{cls.__name__}" in sub["properties"]["_target_"]["enum"]
        assert sub["additionalProperties"] is False
    # the builder passes every module to the Diffusers fallback: a YAML may not
    fallback = schema["$defs"]["DiffusersPipelineStage"]["properties"]
    assert "call_kwargs" in fallback and "modules" not in fallback and "pipeline_class" not in fallback
    assert "encoders" in schema["$defs"]["TextEncodingStage"]["required"]


def test_stage_arguments_schema_from_signature():
    sub = stage_arguments_schema(InputValidationStage, {})
    assert sub["properties"]["multiple_of"] == {"minimum": 1, "type": "integer", "default": 1}
    assert sub["required"] == ["_target_"]


def test_schema_output_file(tmp_path):
    out = tmp_path / "diffstage.schema.json"
    r = run("schema", "--output", str(out))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(out.resolve())
    assert out.read_text() == model_schema_json() and json.loads(out.read_text()) == model_schema()
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temporary file left
    before = out.read_text()
    r = run("schema", "--output", str(out))
    assert r.returncode == 2
    assert r.stderr == f"error: '{out}' exists; diffstage never overwrites a file: remove it or choose another path\n"
    assert out.read_text() == before
    r = run("schema", "--output", str(out / "s.json"))  # a folder that cannot be made (missing ones are made)
    assert r.returncode == 2 and r.stderr.startswith(f"error: cannot write into '{out}'")


def test_schema_header_in_a_yaml_is_just_a_comment(validator, tmp_path):
    # the editor header documented in README changes nothing for diffstage
    path = tmp_path / "model.yaml"
    path.write_text("# yaml-language-server: $schema=./diffstage.schema.json\n" + FLUX_YAML.read_text())
    data = yaml.safe_load(path.read_text())
    assert data == _flux() and _errors(validator, data) == []
    r = run("validate", str(path))
    assert r.returncode == 0, r.stderr

