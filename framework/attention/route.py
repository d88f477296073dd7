"""A stock module's attention run by diffstage's attention layer: its backends and sequence parallelism.

Diffusers' attention processors differ by family (joint text-image attention, cross-attention, rotary
embeddings, QK norms), but they all end in torch's `scaled_dot_product_attention` (the classic processors
call it directly; the newer ones through Diffusers' native dispatch backend). So the engine leaves the
processors alone and, while an attention module runs, catches that one call with a TorchFunctionMode
(torch's own interception point, per thread) and computes it with `attention()` instead:

- with a backend other than sdpa, that backend computes it;
- inside a sequence-parallel call, a module whose keys are split too (self- and joint attention) attends
  over every rank's tokens (Ulysses / Ring, a key mask gathered with its keys); a module whose keys every
  rank holds whole (cross-attention to the text) computes locally, with no exchange.

Only instances are wrapped (`install_attention_route`), and only while a call is routed (`routed_attention`)
does anything change: otherwise a wrapped module calls its class's forward as it is."""
from __future__ import annotations

import contextlib
import fnmatch
import math
import types
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..errors import DiffstageError
from .backends import get_backend

SLOT = "_diffstage_attention_route"  # a wrapped attention module: its AttentionSlot
ROUTED = "_diffstage_routed_attention"  # a module whose attention modules are wrapped: their slots


@dataclass(frozen=True)
class AttentionSlot:
    path: str  # the attention module's path in the declared module
    local: bool  # its keys are whole on every rank (cross-attention): no exchange under sequence parallelism


@dataclass(frozen=True)
class Route:
    """How the attention modules of one call run: a backend, and the sequence-parallel layout (or None)."""

    backend: str
    state: object | None  # distributed.ParallelState while the sequence is split


_ROUTE: ContextVar[Route | None] = ContextVar("diffstage_attention_route", default=None)


class _Catch(TorchFunctionMode):
    """Inside one attention module's forward: its scaled_dot_product_attention computed by `attention()`."""

    def __init__(self, slot: AttentionSlot, route: Route):
        super().__init__()
        self.slot, self.route, self.calls = slot, route, 0

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        self.calls += 1
        return self.attend(*args, **kwargs)

    def attend(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
               enable_gqa=False):
        split = self.route.state is not None and not self.slot.local
        usual = scale is None or math.isclose(scale, query.shape[-1] ** -0.5, rel_tol=1e-6)
        if query.dim() != 4 or dropout_p or is_causal or enable_gqa or not usual:
            if split:
                raise DiffstageError(f"sequence parallelism: attention module '{self.slot.path}' calls "
                                     "scaled_dot_product_attention with a causal mask, dropout, grouped heads or "
                                     "a custom scale, which diffstage's parallel attention does not split")
            return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                                  is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # sdpa's [B, H, L, D] -> ours [B, L, H, D]
        if split:
            from ..distributed.sequence import key_mask, parallel_attention

            mask = key_mask(attn_mask, f"attention module '{self.slot.path}'")
            out = parallel_attention(q, k, v, mask, self.route.backend, self.route.state)
        else:
            out = get_backend(self.route.backend)(q, k, v, attn_mask)
        return out.transpose(1, 2)


def _forward(module: torch.nn.Module, *args, **kwargs):
    """A wrapped attention module's forward: its class's, with its attention caught while a call is routed."""
    route = _ROUTE.get()
    slot = module.__dict__[SLOT]
    split = route is not None and route.state is not None and not slot.local
    if route is None or (route.backend == "sdpa" and not split):
        return type(module).forward(module, *args, **kwargs)
    catch = _Catch(slot, route)
    with catch:
        out = type(module).forward(module, *args, **kwargs)
    if split and not catch.calls:
        raise DiffstageError(f"sequence parallelism: attention module '{slot.path}' ({type(module).__name__}, "
                             f"processor {type(getattr(module, 'processor', None)).__name__}) computed its attention "
                             "without torch's scaled_dot_product_attention, so its keys were not exchanged between "
                             "the ranks; use a processor that calls it, or run with parallel.cfg only")
    return out


def attention_modules(module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Diffusers' attention modules inside `module` (those with an attention processor), by path."""
    return {name: m for name, m in module.named_modules() if name and hasattr(m, "processor")
            and callable(getattr(m, "set_processor", None))}


def install_attention_route(module: torch.nn.Module, local: list[str] | None) -> dict[str, AttentionSlot]:
    """Wrap `module`'s attention modules so routed calls run through `attention()`. `local`: path patterns of
    those whose keys every rank holds whole (default: those marked is_cross_attention)."""
    slots = {}
    for path, attn in attention_modules(module).items():
        is_local = any(fnmatch.fnmatchcase(path, p) for p in local) if local is not None else \
            bool(getattr(attn, "is_cross_attention", False))
        slots[path] = AttentionSlot(path, is_local)
        attn.__dict__[SLOT] = slots[path]
        attn.forward = types.MethodType(_forward, attn)  # this instance only
    setattr(module, ROUTED, slots)
    return slots


@contextlib.contextmanager
def routed_attention(module: torch.nn.Module, backend: str, state=None) -> Iterator[None]:
    """Calls of `module` inside run their wrapped attention modules with `backend`, across the sequence
    group of `state` when given. A module without wrapped attention runs as it is."""
    if not hasattr(module, ROUTED):
        yield
        return
    token = _ROUTE.set(Route(backend, state))
    try:
        yield
    finally:
        _ROUTE.reset(token)
