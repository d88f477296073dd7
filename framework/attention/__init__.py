"""The attention layer: q, k, v in [batch, seq, heads, head_dim] -> out in the same layout.

One entry point, `attention(q, k, v, mask=None, backend="sdpa")`, dispatching to a
registered backend. `reference` is the plain-math spec every other backend is tested
against; `sdpa` (torch's scaled_dot_product_attention) is the default; `flash_attn` and
`sage` register only when their packages import. A later sequence-parallel wrapper sits
around `attention()` (all-to-all before, after) without touching model code."""
from __future__ import annotations

from .backends import available_backends, get_backend, register_backend
from .layer import attention

__all__ = ["attention", "available_backends", "get_backend", "register_backend"]
