"""`extends:` variants: merged key by key, errors point at the file the key came from."""
from pathlib import Path

import pytest

from diffstage import SpecError, check_model

from conftest import FLUX_YAML, line_of


def write(path, text):
    path.write_text(text)
    return path


def test_shipped_schnell_is_a_variant_of_flux():
    dev, schnell = check_model("flux"), check_model("flux_schnell")
    assert schnell.spec.name == "flux_schnell" and schnell.spec.sampling.num_inference_steps == 4
    assert schnell.spec.sampling.height == dev.spec.sampling.height == 1024  # inherited
    assert schnell.spec.stages == dev.spec.stages
    assert "extends" not in schnell.data


def test_variant_overrides_merge_and_replace(tmp_path):
    path = write(tmp_path / "v.yaml", "extends: flux\nname: v\nsampling:\n  height: 512\n"
                 "pipeline_config:\n  settings:\n    foo: 1\n")
    checked = check_model(path)
    assert checked.spec.sampling.height == 512 and checked.spec.sampling.width == 1024
    assert checked.spec.pipeline_config.settings == {"foo": 1}
    assert "denoising" in checked.spec.pipeline_config.callbacks  # sibling keys kept


def test_error_in_variant_points_at_variant(tmp_path):
    path = write(tmp_path / "v.yaml", "extends: flux\nname: v\nsampling:\n  heigth: 512\n")
    with pytest.raises(SpecError) as e:
        check_model(path)
    (p,) = e.value.problems
    assert (p.file, p.line, p.key) == (str(path), 4, "sampling.heigth")


def test_error_from_base_points_at_base(tmp_path):
    base = write(tmp_path / "base.yaml", FLUX_YAML.read_text().replace("    multiple_of: 16", "    multiple_off: 16"))
    child = write(tmp_path / "child.yaml", "extends: base.yaml\nname: child\n")
    with pytest.raises(SpecError) as e:
        check_model(child)
    (p,) = e.value.problems
    assert (p.file, p.line) == (str(base), line_of(base, "multiple_off"))


def test_replaced_list_does_not_keep_base_lines(tmp_path):
    child = write(tmp_path / "child.yaml", "extends: flux\nname: c\nstages:\n  - _target_: diffstage.stages.Nope\n")
    with pytest.raises(SpecError) as e:
        check_model(child)
    assert all(p.file == str(child) for p in e.value.problems if p.key.startswith("stages"))


def test_cycle_and_unknown_base(tmp_path):
    write(tmp_path / "a.yaml", "extends: b.yaml\nname: a\n")
    write(tmp_path / "b.yaml", "extends: a.yaml\nname: b\n")
    with pytest.raises(SpecError, match=r"`extends` forms a cycle: a.yaml -> b.yaml -> a.yaml"):
        check_model(tmp_path / "a.yaml")
    bad = write(tmp_path / "c.yaml", "name: c\nextends: fluxx\n")
    with pytest.raises(SpecError) as e:
        check_model(bad)
    (p,) = e.value.problems
    assert p.line == 2 and "cannot extend: unknown model 'fluxx'; did you mean 'flux'?" in p.message


def test_inherited_model_path_stays_relative_to_its_own_file(tmp_path, monkeypatch):
    monkeypatch.chdir("/")
    child = write(tmp_path / "my_digits.yaml", "extends: digits\nname: my_digits\n")
    checked = check_model(child)
    assert (Path(checked.spec.model_path) / "model_index.json").is_file()


def test_relative_extends_never_uses_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    write(tmp_path / "base.yaml", FLUX_YAML.read_text())
    child = write(tmp_path / "sub" / "child.yaml", "extends: base.yaml\nname: child\n")
    monkeypatch.chdir(tmp_path)  # base.yaml is here, but not next to child.yaml
    with pytest.raises(SpecError, match="cannot extend: .*sub/base.yaml' does not exist"):
        check_model(child)
