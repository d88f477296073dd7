"""Ops DiTs spend time on outside matmuls: RMSNorm, adaLN modulate, gated residual, RoPE.

Each has three implementations with one signature: `reference` (plain PyTorch, the spec
the others are tested against), `compiled` (the spec through torch.compile) and `triton`
(hand-written kernels; needs the `triton` extra and a GPU, or TRITON_INTERPRET=1).
`get_kernels(name, device)` returns one set; `auto` picks by device (see `resolve_kernels`)."""
from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import DiffstageError
from .reference import apply_rope, gated_residual, modulate, rms_norm

KERNEL_CHOICES = ("auto", "reference", "compiled", "triton")
_OPS = ("rms_norm", "modulate", "gated_residual", "apply_rope")


@dataclass(frozen=True)
class Kernels:
    """One implementation of every op."""

    name: str
    rms_norm: Callable
    modulate: Callable
    gated_residual: Callable
    apply_rope: Callable


def triton_usable(device: str | torch.device) -> bool:
    """Triton kernels run on CUDA devices, or anywhere under the interpreter."""
    if importlib.util.find_spec("triton") is None:
        return False
    return torch.device(device).type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def resolve_kernels(name: str, device: str | torch.device = "cpu") -> str:
    """The implementation `name` stands for on `device`, checked to be usable there.

    auto: triton on CUDA when installed, else compiled on CUDA; reference on CPU, where
    compiling the four ops costs ~15 s on first use that a short job never earns back (use
    runtime.compile=true there: whole blocks compile and Inductor fuses these ops)."""
    if name not in KERNEL_CHOICES:
        raise DiffstageError(f"unknown kernels '{name}'; choose one of: {', '.join(KERNEL_CHOICES)}")
    dev = torch.device(device).type
    if name == "auto":
        if dev == "cuda":
            return "triton" if triton_usable(device) else "compiled"
        return "reference"
    if name == "triton" and not triton_usable(device):
        why = ("the 'triton' package is not installed (pip install 'diffstage[triton]')"
               if importlib.util.find_spec("triton") is None else
               f"Triton kernels need a CUDA device (this run is on '{dev}'), or TRITON_INTERPRET=1 to interpret them")
        raise DiffstageError(f"kernels 'triton' cannot run: {why}; use kernels=reference or compiled")
    return name


def get_kernels(name: str = "auto", device: str | torch.device = "cpu") -> Kernels:
    impl = resolve_kernels(name, device)
    module = importlib.import_module(f".{'triton_ops' if impl == 'triton' else impl}", __name__)
    return Kernels(impl, *(getattr(module, op) for op in _OPS))


__all__ = ["KERNEL_CHOICES", "Kernels", "apply_rope", "gated_residual", "get_kernels", "modulate",
           "resolve_kernels", "rms_norm", "triton_usable"]
