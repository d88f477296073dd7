"""The reference ops through torch.compile: Inductor fuses each op's elementwise passes
into one kernel (C++ on CPU, Triton on GPU). Compiled on first use, with dynamic shapes so
a new sequence length does not recompile."""
from __future__ import annotations

import functools

import torch

from . import reference


@functools.cache
def _compiled(name: str):
    return torch.compile(getattr(reference, name), dynamic=True)


def rms_norm(x, weight=None, eps=1e-6):
    return _compiled("rms_norm")(x, weight, eps)


def modulate(x, shift, scale, eps=1e-6):
    return _compiled("modulate")(x, shift, scale, eps)


def gated_residual(x, y, gate):
    return _compiled("gated_residual")(x, y, gate)


def apply_rope(x, cos, sin, layout="interleaved"):
    return _compiled("apply_rope")(x, cos, sin, layout)
