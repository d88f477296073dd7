"""The dtype a stage casts its inputs to is the module's compute dtype, past the parameters a Diffusers class
keeps in float32 (`_keep_in_fp32_modules`): Wan in bfloat16 runs."""
import numpy as np
import pytest
import torch

from diffstage import build_pipeline
from diffstage.torch_utils import module_dtype


def test_module_dtype_skips_the_modules_kept_in_float32():
    class Model(torch.nn.Module):
        _keep_in_fp32_modules = ["scale_shift_table"]

        def __init__(self):
            super().__init__()
            self.scale_shift_table = torch.nn.Parameter(torch.zeros(2))  # first, and float32 on purpose
            self.proj = torch.nn.Linear(2, 2).to(torch.bfloat16)

    assert module_dtype(Model()) == torch.bfloat16
    assert module_dtype(torch.nn.Linear(2, 2)) == torch.float32
    assert module_dtype(object()) == torch.float32


@pytest.fixture(scope="module")
def tiny_wan(tmp_path_factory):
    from diffstage.models.wan.tiny import build_tiny_wan

    return build_tiny_wan(tmp_path_factory.mktemp("ckpt") / "tiny-wan")


def test_wan_runs_in_bfloat16(tiny_wan):
    request = dict(prompt="a red fox", negative_prompt="blurry", guidance_scale=4.0, seed=3, num_inference_steps=2,
                   height=32, width=48, max_sequence_length=16, num_frames=5, output_type="np")
    full = build_pipeline("wan_t2v", model_path=tiny_wan, overrides=["reuse.enabled=false"])(**request).images
    half = build_pipeline("wan_t2v", model_path=tiny_wan,
                          overrides=["reuse.enabled=false", "runtime.dtype=bfloat16"])(**request).images
    diff = float(np.abs(np.asarray(half, np.float32) - full).max())
    print(f"wan_t2v bfloat16 vs float32: max|Δ| = {diff:.3g}")
    assert np.isfinite(half).all() and diff <= 0.15  # bfloat16 keeps 8 bits of mantissa
