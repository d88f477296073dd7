import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download anything
os.environ.setdefault("TQDM_DISABLE", "1")
# Triton kernels run through the interpreter on the CPU; read when triton.jit decorates them.
os.environ.setdefault("TRITON_INTERPRET", "1")
# runtime.matmul_dtype=auto picks bf16 for large models on CPUs with native bf16: the tests compare float32
# runs with Diffusers on every machine alike, so they pin the detection (tests/test_runtime_auto.py sets it).
os.environ["DIFFSTAGE_NATIVE_BF16"] = "0"

REPO = Path(__file__).resolve().parents[1]
FLUX_YAML = REPO / "pipelines_yaml" / "flux.yaml"


@pytest.fixture(scope="session")
def tiny_flux_dev(tmp_path_factory):
    from diffstage.models.flux.tiny import build_tiny_flux

    return build_tiny_flux(tmp_path_factory.mktemp("ckpt") / "tiny-flux-dev", variant="dev")


@pytest.fixture(scope="session")
def tiny_flux_schnell(tmp_path_factory):
    from diffstage.models.flux.tiny import build_tiny_flux

    return build_tiny_flux(tmp_path_factory.mktemp("ckpt") / "tiny-flux-schnell", variant="schnell")


@pytest.fixture
def flux_yaml_variant(tmp_path):
    """Write a copy of flux.yaml with text replacements applied; returns its path."""

    def make(*replacements: tuple[str, str], name: str = "model.yaml") -> Path:
        text = FLUX_YAML.read_text()
        for old, new in replacements:
            assert old in text, f"test setup: {old!r} not in flux.yaml"
            text = text.replace(old, new, 1)
        path = tmp_path / name
        path.write_text(text)
        return path

    return make


def assert_matches_diffusers(ours, expected, label: str, tol: float = 1e-4) -> float:
    """diffstage's output against the Diffusers pipeline's: same shape, max |Δ| within `tol`, and not a
    constant image (a broken model could match a broken reference trivially). Prints and returns max |Δ|."""
    import numpy as np

    assert ours.shape == expected.shape
    diff = float(np.abs(ours - expected).max())
    print(f"{label}: max|Δ| = {diff:.3g}")
    assert diff <= tol
    assert float(np.abs(expected - expected.mean()).max()) > 1e-3
    return diff


def line_of(path: Path, needle: str) -> int:
    """1-based line of the first line containing `needle`."""
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if needle in line:
            return i
    raise AssertionError(f"{needle!r} not in {path}")


def problems_of(path, **kw):
    """The problems check_model reports for a model YAML (it must report some)."""
    from diffstage import SpecError, check_model

    with pytest.raises(SpecError) as e:
        check_model(path, **kw)
    return e.value.problems
