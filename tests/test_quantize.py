"""runtime.quantize through torchao: a quantized tiny FLUX run stays close to float32 (PSNR, below), with our
native kernels; a quantized module is never shared with an unquantized pipeline; and every way to ask for
something that cannot run is refused with a message naming the key, before any weight loads."""
import math
import sys

import numpy as np
import pytest
import torch

from diffstage import build_pipeline
from diffstage.errors import DiffstageError, LoadError
from diffstage.model_check import check_model
from diffstage.quantize import quantize_targets
from diffstage.session import Session

pytest.importorskip("torchao")

SMALL = ["sampling.height=32", "sampling.width=32", "sampling.num_inference_steps=2",
         "sampling.max_sequence_length=16", "runtime.kernels=reference", "runtime.compile=false",
         "runtime.matmul_dtype=null"]
# int8 weights (per output channel) on random tiny weights: measured 65 dB for int8 and 62 dB for int8_dynamic
# against float32; 40 dB (a mean error of 1% of the range) is far below, and far above a broken run (~10 dB).
MIN_PSNR = 40.0


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def image(pipe) -> np.ndarray:
    return pipe("a red fox", seed=0, output_type="np").images


def quantized_linears(module) -> list[str]:
    return [type(m.weight).__name__ for m in module.modules() if isinstance(m, torch.nn.Linear)
            and type(m.weight) not in (torch.Tensor, torch.nn.Parameter)]


@pytest.mark.parametrize("method", ["int8", "int8_dynamic"])
def test_quantized_flux_is_close_to_float32_and_not_shared(tiny_flux_dev, method):
    session = Session()
    plain = build_pipeline("flux", model_path=tiny_flux_dev, overrides=SMALL, session=session)
    expected = image(plain)
    quantized = build_pipeline("flux", model_path=tiny_flux_dev, session=session,
                               overrides=[*SMALL, f"runtime.quantize={method}"])
    transformer = quantized.modules["transformer"]
    assert transformer is not plain.modules["transformer"]
    assert quantized_linears(transformer) and quantized_linears(plain.modules["transformer"]) == []
    assert quantized.modules["vae"] is plain.modules["vae"]  # what is not quantized stays shared
    assert psnr(image(quantized), expected) > MIN_PSNR
    assert np.array_equal(image(plain), expected)  # the float32 pipeline is unchanged by the other's build


def test_text_encoder_quantized_when_named(tiny_flux_dev):
    pipe = build_pipeline("flux", model_path=tiny_flux_dev, session=Session(),
                          overrides=[*SMALL, "runtime.quantize=int8", "runtime.quantize_modules=[text_encoder_2]"])
    assert quantized_linears(pipe.modules["text_encoder_2"])
    assert quantized_linears(pipe.modules["transformer"]) == []  # only the named modules
    assert image(pipe).shape == (1, 32, 32, 3)


def test_default_modules_are_the_denoiser():
    runtime = {"quantize": "int8", "quantize_modules": None}
    assert quantize_targets(runtime, check_model("flux")) == {"transformer": "int8"}
    assert quantize_targets(runtime, check_model("sd15")) == {"unet": "int8"}
    assert quantize_targets({"quantize": "none"}, check_model("sd15")) == {}


def build_error(tiny_flux_dev, *overrides, error=DiffstageError) -> str:
    with pytest.raises(error) as e:
        build_pipeline("flux", model_path=tiny_flux_dev, session=Session(), overrides=[*SMALL, *overrides])
    return str(e.value)


def test_bad_value_refused(tiny_flux_dev):
    text = build_error(tiny_flux_dev, "runtime.quantize=int4", "runtime.quantize_modules=transformer")
    assert "runtime.quantize must be one of none | int8 | int8_dynamic | fp8, got 'int4'" in text
    assert "runtime.quantize_modules must be a list of module names" in text


def test_matmul_dtype_with_quantize_refused(tiny_flux_dev):
    text = build_error(tiny_flux_dev, "runtime.quantize=int8", "runtime.matmul_dtype=bfloat16")
    assert "runtime.matmul_dtype=bfloat16 and runtime.quantize=int8 both choose" in text


def test_fp8_on_cpu_refused(tiny_flux_dev):
    text = build_error(tiny_flux_dev, "runtime.quantize=fp8")
    assert "runtime.quantize=fp8 needs a CUDA GPU (float8 matmuls), but the run's device is cpu" in text


def test_unknown_module_refused(tiny_flux_dev):
    text = build_error(tiny_flux_dev, "runtime.quantize=int8", "runtime.quantize_modules=[transfomer]")
    assert "runtime.quantize_modules: model 'flux' has no module 'transfomer' (did you mean 'transformer'?)" in text


def test_module_without_weights_refused_before_any_weight_loads(tiny_flux_dev, monkeypatch):
    import diffstage.loader as loader

    loads = []
    real = loader._load_module
    monkeypatch.setattr(loader, "_load_module", lambda name, *a, **kw: loads.append(name) or real(name, *a, **kw))
    text = build_error(tiny_flux_dev, "runtime.quantize=int8", "runtime.quantize_modules=[tokenizer_2]", error=LoadError)
    assert "module 'tokenizer_2' is a T5Tokenizer" in text and "no weights to quantize" in text
    assert loads == []  # refused before the modules listed before it (vae, text encoders) loaded


def test_missing_torchao_names_the_extra(tiny_flux_dev, monkeypatch):
    for name in [m for m in sys.modules if m == "torchao" or m.startswith("torchao.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "torchao", None)  # `import torchao` now raises ImportError
    text = build_error(tiny_flux_dev, "runtime.quantize=int8")
    assert "runtime.quantize needs torchao, which is not installed: pip install diffstage[quant]" in text


def test_lora_adapters_apply_to_a_quantized_transformer(tiny_flux_dev, tmp_path):
    pytest.importorskip("peft")
    from diffusers import FluxPipeline
    from test_lora import make_lora

    ref = FluxPipeline.from_pretrained(tiny_flux_dev, torch_dtype=torch.float32)
    adapter = make_lora(ref, tmp_path / "style.safetensors", {"transformer": ["to_q", "to_k", "to_v"]}, seed=1)
    loras = [{"path": str(adapter), "scale": 1.0}]
    session = Session()
    plain = build_pipeline("flux", model_path=tiny_flux_dev, overrides=SMALL, session=session)
    quantized = build_pipeline("flux", model_path=tiny_flux_dev, session=session,
                               overrides=[*SMALL, "runtime.quantize=int8"])
    expected = plain("a red fox", seed=0, output_type="np", loras=loras).images
    ours = quantized("a red fox", seed=0, output_type="np", loras=loras).images
    assert psnr(ours, expected) > MIN_PSNR
    assert psnr(ours, image(quantized)) < psnr(ours, expected) - 10  # the adapter changed the quantized run


def test_fusing_lora_into_a_quantized_transformer_is_refused_and_changes_nothing(tiny_flux_dev, tmp_path):
    pytest.importorskip("peft")
    from diffusers import FluxPipeline
    from test_lora import make_lora

    from diffstage.errors import LoraError

    ref = FluxPipeline.from_pretrained(tiny_flux_dev, torch_dtype=torch.float32)
    adapter = make_lora(ref, tmp_path / "style.safetensors", {"transformer": ["to_q", "to_k", "to_v"]}, seed=1)
    quantized = build_pipeline("flux", model_path=tiny_flux_dev, session=Session(),
                               overrides=[*SMALL, "runtime.quantize=int8"])
    before = image(quantized)
    with pytest.raises(LoraError, match=r"style\.safetensors: cannot fuse into a quantized layer \(its weight is a "
                                        r"Int8Tensor, runtime\.quantize\); use the adapters unfused"):
        quantized.fuse_loras([{"path": str(adapter), "scale": 1.0}])
    assert np.array_equal(image(quantized), before)


def test_a_model_whose_modules_come_from_the_checkpoint_says_quantize_cannot_name_them():
    from pathlib import Path

    digits = Path(__file__).resolve().parents[1] / "models" / "digits" / "checkpoint"
    with pytest.raises(DiffstageError) as e:
        build_pipeline("diffusers_auto", model_path=digits, session=Session(),
                       overrides=["runtime.quantize=int8", "runtime.quantize_modules=[transformer]"])
    assert str(e.value) == ("runtime.quantize=int8: model 'diffusers_auto' lists no modules of its own (they come from "
                            "the checkpoint), so runtime.quantize_modules cannot name them; use a model YAML that "
                            "lists its modules")
