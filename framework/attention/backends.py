"""Attention backends. Each takes q, k, v as [batch, seq, heads, head_dim] and an optional
mask broadcastable to [batch, heads, seq_q, seq_k] (bool: True = attend; float: added to
the scores), and returns [batch, seq_q, heads, head_dim]."""
from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..errors import DiffstageError

Backend = Callable[..., torch.Tensor]
_BACKENDS: dict[str, Backend] = {}
# Optional backends: name -> the package that must import for it to exist.
_OPTIONAL = {"flash_attn": "flash_attn", "sage": "sageattention"}


def register_backend(name: str, fn: Backend) -> None:
    _BACKENDS[name] = fn


def available_backends() -> list[str]:
    return sorted(_BACKENDS)


def known_backends() -> list[str]:
    """Installed backends plus the optional ones diffstage knows how to use."""
    return sorted({*_BACKENDS, *_OPTIONAL})


def get_backend(name: str) -> Backend:
    if name in _BACKENDS:
        return _BACKENDS[name]
    if name in _OPTIONAL:
        raise DiffstageError(f"attention backend '{name}' needs the '{_OPTIONAL[name]}' package, which is not "
                             f"installed; available: {', '.join(available_backends())}")
    raise DiffstageError(f"unknown attention backend '{name}'; available: {', '.join(available_backends())}")


def reference(q, k, v, mask=None):
    """The spec: softmax(q k^T / sqrt(d) + mask) v, in float32."""
    qh, kh, vh = (t.transpose(1, 2).float() for t in (q, k, v))  # [b, h, s, d]
    scores = qh @ kh.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    out = scores.softmax(dim=-1) @ vh
    return out.transpose(1, 2).to(q.dtype)


def sdpa(q, k, v, mask=None):
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


def _flash_attn(q, k, v, mask=None):
    from flash_attn import flash_attn_func

    if mask is not None:
        raise DiffstageError("attention backend 'flash_attn' does not take a mask; use 'sdpa'")
    return flash_attn_func(q, k, v)


def _sage(q, k, v, mask=None):
    from sageattention import sageattn

    if mask is not None:
        raise DiffstageError("attention backend 'sage' does not take a mask; use 'sdpa'")
    return sageattn(q, k, v, tensor_layout="NHD")


register_backend("reference", reference)
register_backend("sdpa", sdpa)
if importlib.util.find_spec("flash_attn") is not None:
    register_backend("flash_attn", _flash_attn)
if importlib.util.find_spec("sageattention") is not None:
    register_backend("sage", _sage)
