"""Reference implementations: the spec, written for clarity. Activations are
[batch, seq, dim] (norms, modulation) or [batch, seq, heads, head_dim] (RoPE); the
arithmetic that decides accuracy runs in float32 and the result keeps the input dtype."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) over the last dim, times `weight` if given."""
    out = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        out = out * weight.float()
    return out.to(x.dtype)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """adaLN: LayerNorm without affine, then x * (1 + scale) + shift; shift/scale are [batch, dim]."""
    normed = F.layer_norm(x.float(), x.shape[-1:], eps=eps)
    return (normed * (1 + scale.float()[:, None]) + shift.float()[:, None]).to(x.dtype)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x + gate * y, with gate [batch, dim] broadcast over the sequence."""
    return (x.float() + gate.float()[:, None] * y.float()).to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               layout: Literal["interleaved", "split_half"] = "interleaved") -> torch.Tensor:
    """Rotary embedding on x [batch, seq, heads, head_dim] with cos/sin [seq, head_dim].

    interleaved: dims (0,1), (2,3), ... are the pairs; split_half: dim i pairs with
    dim i + head_dim/2 (the rotate-half layout)."""
    if x.shape[-1] % 2:
        raise ValueError(f"apply_rope: head_dim must be even, got {x.shape[-1]}")
    if layout == "interleaved":
        real, imag = x.float().reshape(*x.shape[:-1], -1, 2).unbind(-1)
        rotated = torch.stack([-imag, real], dim=-1).flatten(-2)
    elif layout == "split_half":
        first, second = x.float().chunk(2, dim=-1)
        rotated = torch.cat([-second, first], dim=-1)
    else:
        raise ValueError(f"layout must be 'interleaved' or 'split_half', got {layout!r}")
    cos, sin = cos.float()[None, :, None, :], sin.float()[None, :, None, :]
    return (x.float() * cos + rotated * sin).to(x.dtype)
