"""Joining the two CFG branches' model inputs into one batch (DenoisingStage's `cfg_batch`)."""
from __future__ import annotations

import torch

UNJOINABLE = object()


def join_branches(a, b, batch: int):
    """`a` and `b` (one input of each branch) as one batch, cond first: tensors with the batch first are
    concatenated, dicts, lists and tuples joined item by item, and what both branches share (the same object,
    or equal plain values) kept once; UNJOINABLE otherwise (the stage then makes two calls)."""
    if a is b:  # shared by both branches (position ids, a mask of the latents)
        return a
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.dim() == 0 or a.shape != b.shape or a.shape[0] != batch:
            return UNJOINABLE
        return torch.cat([a, b])
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return UNJOINABLE
        items = {k: join_branches(a[k], b[k], batch) for k in a}
        return UNJOINABLE if any(v is UNJOINABLE for v in items.values()) else type(a)(items)
    if isinstance(a, (list, tuple)) and type(a) is type(b):
        if len(a) != len(b):
            return UNJOINABLE
        items = [join_branches(x, y, batch) for x, y in zip(a, b)]
        return UNJOINABLE if any(v is UNJOINABLE for v in items) else type(a)(items)
    if _plain(a) and _plain(b) and type(a) is type(b) and a == b:
        return a
    return UNJOINABLE


def _plain(value) -> bool:
    """A value `==` compares safely (to a bool): not a tensor, array or container of them."""
    return value is None or isinstance(value, (bool, int, float, str, torch.dtype, torch.device))
