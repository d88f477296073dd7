"""Dotted paths resolve only through the allowlist; nothing outside it is imported."""
import sys

import pytest

from diffstage import DiffstageError, DisallowedPathError
from diffstage.resolve import DEFAULT_ALLOWLIST, is_allowed, resolve


@pytest.mark.parametrize("path", ["os.system", "builtins.eval", "subprocess.run", "subprocess.Popen",
                                  "importlib.import_module", "diffstagex.evil"])
def test_refused(path):
    assert not is_allowed(path)
    with pytest.raises(DisallowedPathError, match="outside the import allowlist"):
        resolve(path)


@pytest.mark.parametrize("path", [".diffstage.x", "diffstage..x", "", "diffstage.a-b", "diffstage." + "s." * 200 + "x"])
def test_not_a_dotted_path(path):
    assert not is_allowed(path)
    with pytest.raises(DisallowedPathError, match="is not a dotted Python path .*at most 300 characters"):
        resolve(path)


def test_refused_before_import(tmp_path, monkeypatch):
    (tmp_path / "sneaky_mod.py").write_text("raise SystemExit('imported!')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(DisallowedPathError):
        resolve("sneaky_mod.run")
    assert "sneaky_mod" not in sys.modules


def test_allowed_paths_resolve():
    from diffstage.stages import DecodingStage

    assert resolve("diffstage.stages.DecodingStage") is DecodingStage
    assert resolve("torch.nn.Linear").__name__ == "Linear"
    assert resolve("diffstage.stages.DenoisingStage.default_combine_cfg")(2.0, 1.0, 3.0) == 4.0


def test_user_prefix_and_clear_errors():
    assert resolve("json.dumps", DEFAULT_ALLOWLIST + ("json",))([1]) == "[1]"
    with pytest.raises(DiffstageError, match="has no attribute 'Nope'"):
        resolve("diffstage.stages.Nope")
    with pytest.raises(DiffstageError, match=r"cannot resolve 'diffstage_missing_pkg.x': no module named "
                                             r"'diffstage_missing_pkg' can be imported; a package of your own must be "
                                             r"installed \(pip install -e DIR\) or on PYTHONPATH, besides being in the "
                                             r"allowlist"):
        resolve("diffstage_missing_pkg.x", ("diffstage_missing_pkg",))
    with pytest.raises(DiffstageError, match=r"cannot resolve 'diffstage.no_such_module.x': module 'diffstage' has "
                                             r"no attribute 'no_such_module'"):  # its package imports: not that hint
        resolve("diffstage.no_such_module.x")


def test_private_and_main_parts_refused():
    for path in ("torch.utils.model_dump.__main__.main", "torch._C._nn.gelu", "diffstage.cli.hydra_app._hydra_job"):
        with pytest.raises(DisallowedPathError):
            resolve(path)
    assert resolve("torch.nn.functional.gelu") is not None  # defined in torch._C._nn, reached publicly


def test_reexports_outside_the_allowlist_refused():
    for path, home in (("torch.os.system", "os"), ("diffstage.build_plan.instantiate", "hydra.")):
        with pytest.raises(DisallowedPathError, match=f"reaches '{home}"):
            resolve(path)
