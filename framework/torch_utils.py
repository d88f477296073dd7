"""Small torch helpers shared by stages and the loader."""
from __future__ import annotations

import torch

from .errors import DiffstageError, shown

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[str(name).lower()]
    except KeyError:
        raise DiffstageError(f"unknown dtype '{name}'; use one of: float32, bfloat16, float16") from None


def parse_device(name: str | torch.device | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):  # meta/mps/xpu: untested here, refused
        raise DiffstageError(f"unknown device {shown(str(name))}; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DiffstageError(f"device '{name}' requested but CUDA is not available; use runtime=cpu")
    return device


def module_device(module) -> torch.device:
    try:
        return next(module.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def module_dtype(module) -> torch.dtype:
    """The dtype a module computes in: its first floating parameter's, past those a Diffusers class keeps in
    float32 (`_keep_in_fp32_modules`: a transformer whose first parameter is such a table, in a bfloat16 model)."""
    kept = getattr(module, "_keep_in_fp32_modules", None) or ()
    try:
        named = list(module.named_parameters())
    except AttributeError:
        return torch.float32
    for name, param in named:
        if param.is_floating_point() and not any(k in name for k in kept):
            return param.dtype
    return named[0][1].dtype if named else torch.float32
