"""Model spec schema: unknown keys, types, missing keys and YAML syntax, with file and line."""
import pytest

from diffstage import check_model
from diffstage.yaml_lines import format_key, load_yaml_with_lines

from conftest import line_of, problems_of



def test_shipped_flux_yaml_parses():
    checked = check_model("flux")
    assert checked.spec.pipeline_name == "FluxPipeline"
    assert [p.cls.__name__ for p in checked.plan][0] == "InputValidationStage"
    assert checked.spec.sampling.num_inference_steps == 28


def test_unknown_top_level_key_has_line_and_suggestion(flux_yaml_variant):
    path = flux_yaml_variant(("stages:\n", "stagse: 1\nstages:\n"))
    (p,) = problems_of(path)
    assert p.key == "stagse" and p.file == str(path)
    assert p.line == line_of(path, "stagse")
    assert "unknown key 'stagse'" in p.message
    assert "did you mean 'stages'?" in str(p)


def test_unknown_nested_key_lists_valid_keys(flux_yaml_variant):
    path = flux_yaml_variant(("  num_inference_steps: 28", "  num_inference_stepz: 28"))
    (p,) = problems_of(path)
    assert p.key == "sampling.num_inference_stepz"
    assert "did you mean 'num_inference_steps'?" in str(p)
    assert p.line == line_of(path, "num_inference_stepz")


def test_type_error_names_key_and_value(flux_yaml_variant):
    path = flux_yaml_variant(("  height: 1024", "  height: tall"))
    (p,) = problems_of(path)
    assert p.key == "sampling.height"
    assert "'tall'" in p.message and p.line == line_of(path, "height: tall")


def test_missing_required_key(flux_yaml_variant):
    path = flux_yaml_variant(("pipeline_name: FluxPipeline\n", ""))
    (p,) = problems_of(path)
    assert p.message == "missing required key 'pipeline_name'"


def test_bad_task_value(flux_yaml_variant):
    path = flux_yaml_variant(("task: t2i", "task: text2img"))
    (p,) = problems_of(path)
    assert p.key == "task" and "text2img" in p.message


def test_yaml_syntax_error_reports_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nstages:\n  - _target_: a\n    b: [1, 2\nc: 3\n")
    (p,) = problems_of(path)
    assert p.message.startswith("YAML syntax error")
    assert p.file == str(path) and p.line in (4, 5)


def test_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    (p,) = problems_of(path)
    assert "must be a mapping" in p.message


def test_missing_file_and_unknown_name(tmp_path):
    from diffstage import DiffstageError

    with pytest.raises(DiffstageError, match="does not exist"):
        check_model(tmp_path / "nope.yaml")
    with pytest.raises(DiffstageError, match="unknown model 'flx'; did you mean 'flux'"):
        check_model("flx")


def test_line_map_covers_nested_sequences(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("a:\n  b:\n    - c: 1\n      d: 2\n")
    data, lines = load_yaml_with_lines(path)
    assert data == {"a": {"b": [{"c": 1, "d": 2}]}}
    assert lines.line(("a", "b", 0, "d")) == 4
    assert lines.line(("a", "b", 0, "missing")) == 3  # falls back to the parent
    assert format_key(("stages", 3, "encoders")) == "stages[3].encoders"


def test_duplicate_keys_are_errors(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("name: a\npipeline_config:\n  callbacks:\n    decoding: {}\n    decoding: {}\n")
    (p,) = [p for p in problems_of(path) if "duplicate" in p.message]
    assert p.key == "pipeline_config.callbacks.decoding" and p.line == 5
    assert p.message == "duplicate key 'decoding' (an earlier one at line 4 would be silently replaced)"


def test_duplicate_key_reported_with_other_problems(flux_yaml_variant):
    path = flux_yaml_variant(("task: t2i\n", "task: t2i\ntask: t2v\n"), ("  height: 1024", "  height: tall"))
    problems = problems_of(path)
    assert [p.key for p in problems] == ["task", "sampling.height"]


@pytest.mark.parametrize("spec, key", [("{subfolder: ../../etc}", "modules.vae.subfolder"),
                                       ("{subfolder: /etc}", "modules.vae.subfolder"),
                                       ("{dtype: int8}", "modules.vae.dtype")])
def test_module_spec_values_checked(flux_yaml_variant, spec, key):
    path = flux_yaml_variant(("  vae:\n", f"  vae: {spec}\n"))
    (p,) = problems_of(path)
    assert p.key == key and p.line == line_of(path, "  vae: {")
