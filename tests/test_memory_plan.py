"""The memory estimate before any weight loads (diffstage/memory_plan.py, `diffstage validate --memory`): weights
from the safetensors headers, converted for the run's dtype and quantization, resident per stage by offload,
plus LoRA files and each stage's activations."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from diffstage import build_pipeline
from diffstage.builder import compose_config, plan_from_config
from diffstage.errors import DiffstageError
from diffstage.memory_plan import estimate_memory
from diffstage.session import Session

MODULES = ("transformer", "text_encoder", "text_encoder_2", "vae")


def estimate(ckpt, *overrides):
    return estimate_memory(plan_from_config(compose_config(["model=flux", f"model_path={ckpt}",
                                                            "sampling.height=64", "sampling.width=64", *overrides])))


def file_tensor_bytes(folder: Path) -> int:
    total = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            total += sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())
    return total


def test_weights_are_the_checkpoints_tensor_bytes(tiny_flux_dev):
    memory = estimate(tiny_flux_dev)
    assert sorted(memory.weights) == sorted(MODULES)  # tokenizers and schedulers hold no weights
    for name in MODULES:
        assert memory.checkpoint_bytes[name] == memory.weights[name] == file_tensor_bytes(tiny_flux_dev / name) > 0
    everything = sum(memory.weights.values())
    assert all(stage.weights == everything for stage in memory.stages)  # offload=none: all resident throughout
    denoise = next(s for s in memory.stages if s.label.endswith("DenoisingStage"))
    assert denoise.activations["latents"] > 0 and denoise.activations["transformer activations"] > 0


def test_bfloat16_halves_the_float_weights(tiny_flux_dev):
    full, half = estimate(tiny_flux_dev), estimate(tiny_flux_dev, "runtime.dtype=bfloat16")
    assert half.weights["vae"] * 2 == full.weights["vae"]
    assert half.peak.total < full.peak.total


def quantized_bytes(module) -> int:
    """What a loaded module holds, a torchao weight by its inner tensors (int8 data and scales)."""
    def size(t):
        if type(t) not in (torch.Tensor, torch.nn.Parameter) and hasattr(t, "__tensor_flatten__"):
            return sum(size(getattr(t, n)) for n in t.__tensor_flatten__()[0])
        return t.numel() * t.element_size()
    return sum(size(p) for p in module.parameters())


def test_int8_estimate_matches_the_quantized_module(tiny_flux_dev):
    pytest.importorskip("torchao")
    full, int8 = estimate(tiny_flux_dev), estimate(tiny_flux_dev, "runtime.quantize=int8")
    assert int8.weights["transformer"] < full.weights["transformer"] / 2
    assert all(int8.weights[n] == full.weights[n] for n in MODULES if n != "transformer")
    assert int8.runtime["quantize"] == "int8 (transformer)"
    pipe = build_pipeline("flux", model_path=tiny_flux_dev, session=Session(),
                          overrides=["runtime.quantize=int8", "runtime.matmul_dtype=null"])
    assert int8.weights["transformer"] == quantized_bytes(pipe.modules["transformer"])


def test_offload_keeps_only_the_stages_modules(tiny_flux_dev):
    none, model = estimate(tiny_flux_dev), estimate(tiny_flux_dev, "runtime.offload=model")
    assert model.peak.total < none.peak.total
    decode = model.stages[-1]
    assert decode.label == "5:DecodingStage" and decode.modules == ["vae"]
    assert decode.weights == model.weights["vae"]


def test_lora_files_are_counted(tiny_flux_dev, tmp_path):
    adapter = tmp_path / "style.safetensors"
    save_file({"lora_A.weight": torch.zeros(4, 64)}, str(adapter))
    base = estimate(tiny_flux_dev)
    with_lora = estimate(tiny_flux_dev, f"lora=[{{path:{adapter},scale:0.5}}]")
    assert with_lora.lora == {str(adapter): adapter.stat().st_size}
    assert with_lora.peak.total == base.peak.total + adapter.stat().st_size
    with pytest.raises(DiffstageError, match=r"lora\[0\]\.path: LoRA file .*missing.safetensors: cannot read it \(No such file or directory\)"):
        estimate(tiny_flux_dev, f"lora=[{{path:{tmp_path / 'missing.safetensors'}}}]")


def cli(*args):
    exe = Path(sys.executable).parent / "diffstage"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "diffstage.cli"]
    return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_cli_prints_the_estimate(tiny_flux_dev):
    r = cli("validate", "flux", "--memory", f"model_path={tiny_flux_dev}", "sampling.height=64",
            "sampling.width=64", "runtime.quantize=int8")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert out.startswith("OK ") and f"memory estimate for model 'flux' ({tiny_flux_dev}), no weights loaded" in out
    assert "request: 64x64, 1 image(s); runtime: device cpu, dtype float32, offload none, quantize int8 (transformer)" in out
    assert "  per stage (weights resident + activations = total):\n    0:InputValidationStage" in out
    assert "  peak: " in out and " in 5:DecodingStage (resident: text_encoder, text_encoder_2, transformer, vae)" in out
    assert "  while loading: up to " in out and "of weights (a module is quantized after it loads in float32)" in out
    assert "torchao" not in r.stderr and "Enum subclass" not in r.stderr  # its import noise is silenced


def test_cli_memory_errors(tiny_flux_dev, capsys):
    r = cli("validate", "flux", "--memory", f"model_path={tiny_flux_dev}", "runtime.quantize=int8",
            "runtime.quantize_modules=[vea]")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "runtime.quantize_modules: model 'flux' has no module 'vea' (did you mean 'vae'?)" in r.stderr
    from diffstage.cli import main

    with pytest.raises(SystemExit) as e:
        main(["validate", "flux", "sampling.height=64"])
    assert e.value.code == 2
    assert "overrides (sampling.height=64) are only taken with --memory" in capsys.readouterr().err
