"""Triton kernels for the reference ops, one program per row of the last dimension.

Arithmetic runs in float32 and results are stored in the input dtype, as in the spec.
On a CPU they run only under the interpreter (TRITON_INTERPRET=1, set before this module
is imported), which is how the tests check them; on a GPU they compile."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, dim, eps, HAS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < dim
    x = tl.load(x_ptr + row * dim + cols, mask=mask, other=0.0).to(tl.float32)
    out = x * tl.rsqrt(tl.sum(x * x, axis=0) / dim + eps)
    if HAS_WEIGHT:
        out = out * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * dim + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _modulate_kernel(x_ptr, shift_ptr, scale_ptr, out_ptr, seq, dim, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    batch = row // seq
    cols = tl.arange(0, BLOCK)
    mask = cols < dim
    x = tl.load(x_ptr + row * dim + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / dim
    centred = tl.where(mask, x - mean, 0.0)
    normed = centred * tl.rsqrt(tl.sum(centred * centred, axis=0) / dim + eps)
    shift = tl.load(shift_ptr + batch * dim + cols, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + batch * dim + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * dim + cols, (normed * (1 + scale) + shift).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_residual_kernel(x_ptr, y_ptr, gate_ptr, out_ptr, seq, dim, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    batch = row // seq
    cols = tl.arange(0, BLOCK)
    mask = cols < dim
    x = tl.load(x_ptr + row * dim + cols, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + row * dim + cols, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + batch * dim + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * dim + cols, (x + gate * y).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, seq, heads, dim,
                 INTERLEAVED: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)  # one (batch, position, head)
    pos = (row // heads) % seq
    cols = tl.arange(0, BLOCK)
    mask = cols < dim
    if INTERLEAVED:  # pairs (0,1), (2,3), ...: rotated[2i] = -x[2i+1], rotated[2i+1] = x[2i]
        partner = cols ^ 1
        sign = tl.where(cols % 2 == 0, -1.0, 1.0)
    else:  # split-half: dim i pairs with i + dim/2
        half = dim // 2
        partner = tl.where(cols < half, cols + half, cols - half)
        sign = tl.where(cols < half, -1.0, 1.0)
    x = tl.load(x_ptr + row * dim + cols, mask=mask, other=0.0).to(tl.float32)
    other = tl.load(x_ptr + row * dim + partner, mask=mask, other=0.0).to(tl.float32)
    cos = tl.load(cos_ptr + pos * dim + cols, mask=mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + pos * dim + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * dim + cols, (x * cos + sign * other * sin).to(out_ptr.dtype.element_ty), mask=mask)


def _block(dim: int) -> int:
    return triton.next_power_of_2(dim)


def _check_per_batch(op: str, x: torch.Tensor, **vectors: torch.Tensor) -> None:
    """The kernels index [batch, dim] vectors by row; anything else would read out of bounds."""
    for name, v in vectors.items():
        if v.shape != (x.shape[0], x.shape[-1]):
            raise ValueError(f"{op}: {name} must be [batch, dim] = {[x.shape[0], x.shape[-1]]}, got {list(v.shape)}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty_like(x)
    dim = x.shape[-1]
    if weight is not None and weight.shape != (dim,):
        raise ValueError(f"rms_norm: weight must be [{dim}], got {list(weight.shape)}")
    w = weight.contiguous() if weight is not None else x  # unused when HAS_WEIGHT is False
    _rms_norm_kernel[(x.numel() // dim,)](x, w, out, dim, eps, HAS_WEIGHT=weight is not None, BLOCK=_block(dim))
    return out


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty_like(x)
    batch, seq, dim = x.shape
    _check_per_batch("modulate", x, shift=shift, scale=scale)
    _modulate_kernel[(batch * seq,)](x, shift.contiguous(), scale.contiguous(), out, seq, dim, eps,
                                     BLOCK=_block(dim))
    return out


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty_like(x)
    batch, seq, dim = x.shape
    _check_per_batch("gated_residual", x, gate=gate)
    if y.shape != x.shape:
        raise ValueError(f"gated_residual: y must have x's shape {list(x.shape)}, got {list(y.shape)}")
    _gated_residual_kernel[(batch * seq,)](x, y.contiguous(), gate.contiguous(), out, seq, dim, BLOCK=_block(dim))
    return out


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str = "interleaved") -> torch.Tensor:
    if layout not in ("interleaved", "split_half"):
        raise ValueError(f"layout must be 'interleaved' or 'split_half', got {layout!r}")
    x = x.contiguous()
    out = torch.empty_like(x)
    batch, seq, heads, dim = x.shape
    if dim % 2:
        raise ValueError(f"apply_rope: head_dim must be even, got {dim}")
    if cos.shape != (seq, dim) or sin.shape != (seq, dim):
        raise ValueError(f"apply_rope: cos and sin must be [seq, head_dim] = {[seq, dim]}, got "
                         f"{list(cos.shape)} and {list(sin.shape)}")
    _rope_kernel[(batch * seq * heads,)](x, cos.contiguous(), sin.contiguous(), out, seq, heads, dim,
                                         INTERLEAVED=layout == "interleaved", BLOCK=_block(dim))
    return out
