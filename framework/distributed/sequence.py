"""Sequence parallelism: a transformer's token sequence split over processes, attention computed across them.

A native model declares its plan on the class (which inputs are split along which dimension, and along
which dimension its output is gathered):

    sequence_parallel_plan = {"hidden_states": 1, "encoder_hidden_states": 1, "img_ids": 0, "txt_ids": 0}
    sequence_parallel_output = 1

The denoising stage splits those inputs (`shard_inputs`), runs the model with `sequence_parallel()`
active, and gathers the output (`gather_output`). Inside, every diffstage.attention() call sees only its
rank's tokens and runs across the sequence group:

- Ulysses: an all-to-all trades the sequence split for a head split, every rank attends over the whole
  sequence for its heads, and a second all-to-all trades back.
- Ring: each rank keeps its queries, the keys and values travel round the ring, and the partial results
  are merged with the online-softmax rule (running log-sum-exp).
- Both (USP): Ulysses inside each group of `ulysses` ranks, Ring across those groups.

Splits need not be even (a rank may hold one token more), so any sequence length works, and there is no
padding to mask. Per-token work (norms, MLPs, RoPE from each token's own position ids) needs nothing.
A mask over the keys (text padding) splits with them: Ulysses gathers it with the keys, Ring sends each
rank's part round with its keys; a mask that varies over queries or heads is refused.

A stock Diffusers class declares the same in its model YAML (`acceleration.NAME.sequence`, default: its
`_cp_plan`), applied through module hooks (split_plan.py); its attention runs here through
attention/route.py."""
from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import DiffstageError
from .state import ParallelState

_ACTIVE: contextvars.ContextVar[ParallelState | None] = contextvars.ContextVar("diffstage_sequence_parallel",
                                                                             default=None)
TRAFFIC = {"bytes": 0}  # bytes this rank sent in sequence-parallel collectives (the benchmark reads it)


@dataclass(frozen=True)
class Split:
    """How one tensor was split: along `dim`, with each rank's length."""

    dim: int
    lengths: tuple[int, ...]


def split_lengths(n: int, parts: int) -> tuple[int, ...]:
    """torch.tensor_split's sizes: the first n % parts parts get one more."""
    return tuple(n // parts + (1 if i < n % parts else 0) for i in range(parts))


def shard(value: torch.Tensor, dim: int, name: str, state: ParallelState) -> torch.Tensor:
    """This rank's share of `value` along `dim` (torch.tensor_split's: the first ranks may hold one more)."""
    parts = state.sequence
    if value.shape[dim] < parts:
        raise DiffstageError(f"sequence parallelism over {parts} processes needs at least {parts} tokens in "
                             f"'{name}', which has {value.shape[dim]}; use fewer processes or a larger image")
    return torch.tensor_split(value, parts, dim=dim)[state.index("sequence")].contiguous()


def shard_inputs(kwargs: dict, plan: dict[str, int], state: ParallelState) -> tuple[dict, dict[str, Split]]:
    """This rank's share of each planned input (the rest unchanged), and how each was split."""
    out, splits = dict(kwargs), {}
    for name, dim in plan.items():
        value = kwargs.get(name)
        if isinstance(value, torch.Tensor):
            out[name] = shard(value, dim, name, state)
            splits[name] = Split(dim, split_lengths(value.shape[dim], state.sequence))
    return out, splits


def gather_output(local: torch.Tensor, dim: int, state: ParallelState) -> torch.Tensor:
    """The whole output from every rank's share along `dim` (shares may differ by one in length)."""
    length = torch.tensor([local.shape[dim]], device=local.device)
    lengths = [torch.zeros_like(length) for _ in range(state.sequence)]
    dist.all_gather(lengths, length, group=state.groups["sequence"])
    lengths = [int(n) for n in lengths]
    pad = list(local.shape)
    pad[dim] = max(lengths) - local.shape[dim]
    padded = torch.cat([local, local.new_zeros(pad)], dim=dim) if pad[dim] else local.contiguous()
    pieces = [torch.empty_like(padded) for _ in range(state.sequence)]
    dist.all_gather(pieces, padded, group=state.groups["sequence"])
    return torch.cat([p.narrow(dim, 0, n) for p, n in zip(pieces, lengths)], dim=dim)


@contextlib.contextmanager
def sequence_parallel(state: ParallelState) -> Iterator[None]:
    """Within this block, diffstage.attention() runs across the sequence group of `state`."""
    token = _ACTIVE.set(state)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active() -> ParallelState | None:
    return _ACTIVE.get()


def _shapes(n_q: int, n_k: int, has_mask: bool, state: ParallelState, mode: str) -> tuple[list[int], list[int], bool]:
    """Every member's local query and key lengths in the `mode` group, and whether any of them has a key mask
    (then all take part in its exchange, a rank without one with zeros: the collectives must match)."""
    mine = torch.tensor([n_q, n_k, int(has_mask)])
    out = [torch.zeros_like(mine) for _ in state.ranks[mode]]
    dist.all_gather(out, mine, group=state.groups[mode])
    return [int(x[0]) for x in out], [int(x[1]) for x in out], any(int(x[2]) for x in out)


def _agreed(mask: torch.Tensor | None, k: torch.Tensor, any_mask: bool) -> torch.Tensor | None:
    """The key mask as [B, L_k] float32 when any member has one (zeros: attend to every key), else None."""
    if mask is None:
        return k.new_zeros(k.shape[:2], dtype=torch.float32) if any_mask else None
    return mask.float().expand(k.shape[0], k.shape[1]).contiguous()


def _ulysses_to_heads(x: torch.Tensor, lengths: list[int], state: ParallelState) -> torch.Tensor:
    """[B, L_mine, H, D] with the group's sequence split -> [B, sum(L), H / P, D] with the heads split."""
    p = len(lengths)
    b, n, h, d = x.shape
    send = x.reshape(b, n, p, h // p, d).permute(2, 0, 1, 3, 4).contiguous()  # [P, B, L_mine, H/P, D]
    recv = x.new_empty(b * sum(lengths) * (h // p) * d)
    chunk = b * (h // p) * d
    dist.all_to_all_single(recv, send.reshape(-1), output_split_sizes=[chunk * n_j for n_j in lengths],
                           input_split_sizes=[chunk * n] * p, group=state.groups["ulysses"])
    TRAFFIC["bytes"] += send.numel() * send.element_size() * (p - 1) // p
    pieces = torch.split(recv, [chunk * n_j for n_j in lengths])
    return torch.cat([piece.reshape(b, n_j, h // p, d) for piece, n_j in zip(pieces, lengths)], dim=1)


def _ulysses_to_sequence(x: torch.Tensor, lengths: list[int], state: ParallelState) -> torch.Tensor:
    """The inverse: [B, sum(L), H / P, D] -> [B, L_mine, H, D]."""
    p = len(lengths)
    me = state.index("ulysses")
    b, _, hp, d = x.shape
    send = torch.cat([piece.reshape(-1) for piece in torch.split(x, lengths, dim=1)])
    n = lengths[me]
    recv = x.new_empty(p * b * n * hp * d)
    dist.all_to_all_single(recv, send, output_split_sizes=[b * n * hp * d] * p,
                           input_split_sizes=[b * n_j * hp * d for n_j in lengths], group=state.groups["ulysses"])
    TRAFFIC["bytes"] += send.numel() * send.element_size() * (p - 1) // p
    return recv.reshape(p, b, n, hp, d).permute(1, 2, 0, 3, 4).reshape(b, n, p * hp, d)


def _block(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q over one key/value block in float32: (output [B, H, Lq, D], log-sum-exp [B, H, Lq, 1]).
    `mask`: additive per key [B or 1, Lk]. A row whose keys are all masked here gives 0 with weight -inf."""
    qh, kh, vh = (t.transpose(1, 2).float() for t in (q, k, v))
    if mask is None and qh.device.type == "cpu":  # torch's fused CPU kernel gives the log-sum-exp too
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qh, kh, vh)[:2]
        return out, lse.unsqueeze(-1)
    scores = qh @ kh.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores + mask[:, None, None, :]
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    out = torch.exp(scores - lse) @ vh
    return (out if mask is None else torch.where(torch.isfinite(lse), out, 0.0)), lse


def _gather_keys(mask: torch.Tensor, lengths: list[int], state: ParallelState, mode: str) -> torch.Tensor:
    """Every member's key mask of the `mode` group, joined in rank order (as their keys are)."""
    mine = torch.nn.functional.pad(mask, (0, max(lengths) - mask.shape[1])).contiguous()
    pieces = [torch.empty_like(mine) for _ in lengths]
    dist.all_gather(pieces, mine, group=state.groups[mode])
    return torch.cat([piece[:, :n] for piece, n in zip(pieces, lengths)], dim=1)


def _merge(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor,
           block_lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two partial results over disjoint keys, merged by their log-sum-exps (online softmax). A part whose keys
    were all masked has log-sum-exp -inf and weighs nothing; a row masked everywhere stays 0."""
    merged = torch.logaddexp(lse, block_lse)
    weights = (torch.exp(lse - merged).nan_to_num(0.0), torch.exp(block_lse - merged).nan_to_num(0.0))
    return out * weights[0] + block_out * weights[1], merged


def _ring(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
          state: ParallelState) -> torch.Tensor:
    """Ring attention: keys and values go round the ring group; partial results merge by log-sum-exp."""
    ranks = state.ranks["ring"]
    p, me = len(ranks), state.index("ring")
    _, lengths, any_mask = _shapes(q.shape[1], k.shape[1], mask is not None, state, "ring")
    mask = _agreed(mask, k, any_mask)
    masks = None if mask is None else torch.split(_gather_keys(mask, lengths, state, "ring"), lengths, dim=1)
    kv = torch.stack([k, v]).contiguous()
    out, lse = _block(q, k, v, None if masks is None else masks[me])
    for step in range(1, p):
        source = (me - step) % p  # whose keys arrive now
        incoming = kv.new_empty((2, kv.shape[1], lengths[source], *kv.shape[3:]))
        ops = [dist.P2POp(dist.isend, kv, ranks[(me + 1) % p], group=state.groups["ring"]),
               dist.P2POp(dist.irecv, incoming, ranks[(me - 1) % p], group=state.groups["ring"])]
        for request in dist.batch_isend_irecv(ops):
            request.wait()
        TRAFFIC["bytes"] += kv.numel() * kv.element_size()
        kv = incoming
        out, lse = _merge(out, lse, *_block(q, kv[0], kv[1], None if masks is None else masks[source]))
    return out.transpose(1, 2).to(q.dtype)


def parallel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, backend,
                       state: ParallelState | None = None) -> torch.Tensor:
    """attention() over the whole sequence of the group of `state` (default: the active one), each rank holding
    its own tokens (queries and keys may differ in length). `mask`: None, or additive per key [B or 1, L_k]
    (key_mask), split as the keys are."""
    state = state or _ACTIVE.get()
    if state.ulysses > 1:
        if q.shape[2] % state.ulysses:
            raise DiffstageError(f"parallel.ulysses={state.ulysses} splits the attention heads, but this model "
                                 f"has {q.shape[2]}; use a degree that divides {q.shape[2]} (or parallel.ring)")
        q_lengths, k_lengths, any_mask = _shapes(q.shape[1], k.shape[1], mask is not None, state, "ulysses")
        mask = _agreed(mask, k, any_mask)
        q = _ulysses_to_heads(q, q_lengths, state)
        k, v = (_ulysses_to_heads(t, k_lengths, state) for t in (k, v))
        if mask is not None:
            mask = _gather_keys(mask, k_lengths, state, "ulysses")
    if state.ring > 1:
        out = _ring(q, k, v, mask, state)
    else:
        from ..attention.backends import get_backend

        out = get_backend(backend)(q, k, v, None if mask is None else mask[:, None, None, :].to(q.dtype))
    return _ulysses_to_sequence(out, q_lengths, state) if state.ulysses > 1 else out


def key_mask(mask: torch.Tensor | None, where: str) -> torch.Tensor | None:
    """sdpa's mask (broadcastable to [B, H, Lq, Lk]) as an additive float32 mask per key [B or 1, Lk]: the one
    kind of mask that splits with the keys. DiffstageError for a mask that varies over heads or queries
    (`where`: whose attention, for the message); one only repeated over them is taken."""
    if mask is None:
        return None
    full = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape)) if mask.dim() < 4 else mask
    if full.dim() != 4 or not bool((full == full[:, :1, :1]).all()):
        raise DiffstageError(f"sequence parallelism splits attention masks over the keys only, but {where} takes "
                             f"a mask of shape {tuple(mask.shape)}, which varies over heads or queries; run this "
                             "model with parallel.cfg only")
    keys = full[:, 0, 0, :]
    if keys.dtype == torch.bool:
        return torch.zeros(keys.shape, dtype=torch.float32, device=keys.device).masked_fill(~keys, float("-inf"))
    return keys.float()
