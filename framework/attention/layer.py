"""`attention()`: shape checks, then the chosen backend."""
from __future__ import annotations

import torch

from ..errors import DiffstageError
from .backends import get_backend

DEFAULT_BACKEND = "sdpa"


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              backend: str = DEFAULT_BACKEND) -> torch.Tensor:
    """Scaled dot-product attention on [batch, seq, heads, head_dim] tensors."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise DiffstageError(f"attention expects q, k, v as [batch, seq, heads, head_dim], got shapes "
                             f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise DiffstageError(f"attention: q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} must share "
                             "batch, heads and head_dim, and k and v their sequence length")
    from ..distributed import sequence

    if sequence.active() is not None:  # inside a sequence-parallel model call: each rank has its own tokens
        return sequence.parallel_attention(q, k, v, sequence.key_mask(mask, "this model's attention"), backend)
    return get_backend(backend)(q, k, v, mask)
