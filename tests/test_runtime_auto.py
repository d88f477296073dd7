"""runtime.matmul_dtype=auto and runtime.compile=auto: what they choose, on which facts, and the line they log."""
import logging
import sys

import pytest
import torch

from test_cli import run
from diffstage import build_pipeline, hardware
from diffstage.native import Linear

BIG = hardware.LARGE_MODEL_LINEAR_PARAMS


@pytest.mark.parametrize("flags, native", [
    (["avx2", "avx512f", "avx512_bf16"], True),  # AMD EPYC (Zen 4), Intel Cooper Lake
    (["avx2", "avx512f", "amx_bf16", "amx_tile"], True),  # Intel Sapphire Rapids
    (["avx2", "avx512f"], False),  # Intel Ice Lake: bf16 matmuls are emulated
])
def test_cpu_bf16_is_native_only_with_avx512_bf16_or_amx(monkeypatch, flags, native):
    monkeypatch.delenv("DIFFSTAGE_NATIVE_BF16")
    monkeypatch.setattr(hardware, "cpu_info", lambda: {"cpu": "Test CPU", "flags": flags})
    got, why = hardware.native_bf16(torch.device("cpu"))
    assert got is native and why.startswith("Test CPU has")
    choice, _ = hardware.auto_matmul_dtype(torch.float32, torch.device("cpu"), BIG)
    assert choice == (torch.bfloat16 if native else None)


@pytest.mark.parametrize("capability, native", [((8, 0), True), ((9, 0), True), ((7, 5), False)])
def test_cuda_bf16_is_native_from_compute_capability_8(monkeypatch, capability, native):
    monkeypatch.delenv("DIFFSTAGE_NATIVE_BF16")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Test GPU")
    got, why = hardware.native_bf16(torch.device("cuda"))
    assert got is native and f"compute capability {capability[0]}.{capability[1]}" in why


def test_matmul_auto_keeps_float32_for_small_models_and_other_dtypes(monkeypatch):
    monkeypatch.setenv("DIFFSTAGE_NATIVE_BF16", "1")
    cpu = torch.device("cpu")
    assert hardware.auto_matmul_dtype(torch.float32, cpu, BIG) == (torch.bfloat16, "DIFFSTAGE_NATIVE_BF16=1")
    small, why = hardware.auto_matmul_dtype(torch.float32, cpu, 800_000)
    assert small is None and "0.8M Linear parameters are too few" in why
    assert hardware.auto_matmul_dtype(torch.bfloat16, cpu, BIG) == (None, "the activations are bfloat16 already")


@pytest.mark.parametrize("planned, params, compiles", [
    (1, BIG, False), (10, BIG, False), (hardware.COMPILE_MIN_IMAGES - 1, BIG, False),
    (hardware.COMPILE_MIN_IMAGES, BIG, True), (None, BIG, False), (10_000, BIG - 1, False),
])
def test_compile_auto_only_for_many_images_of_a_large_model(planned, params, compiles):
    assert hardware.auto_compile(planned, params)[0] is compiles


def test_compile_auto_says_why_it_did_not_compile():
    assert hardware.auto_compile(None, BIG) == (
        False, "the number of images this run makes is unknown (runtime.compile=true to compile anyway)")
    assert hardware.auto_compile(3, BIG) == (
        False, "this run makes 3 images (compiling pays from about 300; runtime.compile=true to compile anyway)")


def test_the_default_run_logs_what_auto_chose_and_why(tiny_flux_dev, caplog):
    with caplog.at_level(logging.INFO, logger="diffstage"):
        pipe = build_pipeline("flux", model_path=tiny_flux_dev)
    line = next(r.getMessage() for r in caplog.records if "runtime auto chose" in r.getMessage())
    assert line.startswith("FluxTransformer: runtime auto chose matmul_dtype=float32 (DIFFSTAGE_NATIVE_BF16=0); "
                           "compile=false (")
    assert all(m.weight.dtype == torch.float32 for m in pipe.modules["transformer"].modules() if isinstance(m, Linear))


def test_auto_picks_bf16_matmuls_for_a_large_model_where_native(tiny_flux_dev, monkeypatch, caplog):
    """The tiny checkpoint stands for a large one (threshold lowered): its Linear weights load as bf16."""
    monkeypatch.setenv("DIFFSTAGE_NATIVE_BF16", "1")
    monkeypatch.setattr(hardware, "LARGE_MODEL_LINEAR_PARAMS", 0)
    with caplog.at_level(logging.INFO, logger="diffstage"):
        pipe = build_pipeline("flux", model_path=tiny_flux_dev, overrides=["reuse.enabled=false"])
    transformer = pipe.modules["transformer"]
    assert {m.weight.dtype for m in transformer.modules() if isinstance(m, Linear)} == {torch.bfloat16}
    assert transformer.dtype == torch.float32  # norms, residuals and attention stay float32
    assert any("matmul_dtype=bfloat16 (DIFFSTAGE_NATIVE_BF16=1)" in r.getMessage() for r in caplog.records)
    assert any("compile=false (this run makes 1 image" in r.getMessage() for r in caplog.records)


def test_explicit_settings_win_over_auto(tiny_flux_dev, monkeypatch):
    monkeypatch.setenv("DIFFSTAGE_NATIVE_BF16", "1")
    monkeypatch.setattr(hardware, "LARGE_MODEL_LINEAR_PARAMS", 0)
    pipe = build_pipeline("flux", model_path=tiny_flux_dev, overrides=["runtime.matmul_dtype=null",
                                                                        "reuse.enabled=false"])
    assert {m.weight.dtype for m in pipe.modules["transformer"].modules() if isinstance(m, Linear)} == {torch.float32}


def test_compile_takes_true_false_or_auto():
    r = run("generate", "runtime.compile=sometimes")
    assert r.returncode == 2 and "runtime.compile must be true or false (or auto), got 'sometimes'" in r.stderr


@pytest.mark.parametrize("argv, jobs", [
    (["generate", "-m", "seed=0,1,2", "sampling.true_cfg_scale=2,4,6", "prompt='a, b'"], 9),
    (["generate", "--multirun", "seed=range(0,100)", "cache=none,teacache", "hydra.sweep.dir=x"], 200),
    (["generate", "-m", "seed=glob(*)"], None),  # Hydra expands it against the config: unknown here
])
def test_a_sweep_counts_its_jobs_for_compile_auto(monkeypatch, argv, jobs):
    from diffstage.cli import hydra_app

    monkeypatch.setattr(sys, "argv", ["diffstage", *argv])
    assert hydra_app.sweep_jobs() == jobs


def test_a_native_bf16_override_that_is_not_0_or_1_is_refused(monkeypatch):
    from diffstage.errors import DiffstageError

    monkeypatch.setenv("DIFFSTAGE_NATIVE_BF16", "yes")
    with pytest.raises(DiffstageError, match=r"environment variable DIFFSTAGE_NATIVE_BF16='yes': expected one of "
                                             r"0, 1 \(1 says bfloat16 runs natively, 0 says it does not\)"):
        hardware.native_bf16(torch.device("cpu"))
