"""The first pass: every stage's target resolved, its arguments checked, and its contract computed from the
valid ones (the later passes need every stage's contract up front)."""
from __future__ import annotations

from typing import Any

from ..errors import shown
from .context import Context
from .records import Contracts, StageContract
from .targets import check_args, resolve_stage


def stage_contracts(ctx: Context, stages: list) -> Contracts:
    found = [(i, _stage_contract(ctx, i, raw)) for i, raw in enumerate(stages)]
    known = [entry for _, entry in found if entry is not None]
    first_unknown = next((i for i, entry in found if entry is None or entry.invalid_values), len(stages))
    writers: dict[str, list[int]] = {}
    for entry in known:
        for f in entry.contract.writes:
            writers.setdefault(f, []).append(entry.index)
    return Contracts(known, first_unknown, len(stages), writers, {e.index: e.contract.reads for e in known})


def _stage_contract(ctx: Context, i: int, raw: Any) -> StageContract | None:
    """stages[i]'s contract, or None when it cannot be known (after recording why, where that is ours to say)."""
    if not isinstance(raw, dict):
        return None  # the schema check reports it
    cls = resolve_stage(ctx, i, raw.get("_target_"))
    if cls is None:
        return None
    name = raw.get("_name_")
    if name is not None and not (isinstance(name, str) and name.isidentifier()):
        ctx.add(("stages", i, "_name_"), f"a stage name must be a Python identifier, got {shown(name)}")
    args = {k: v for k, v in raw.items() if k not in ("_target_", "_name_")}
    valid, bad = check_args(ctx, i, cls, args)
    try:  # the contract from the valid arguments only: invalid values would make noise
        contract = cls.contract({k: v for k, v in args.items() if k not in bad})
    except Exception as e:  # a stage rejecting its own args
        if not bad:
            ctx.add(("stages", i), f"invalid arguments: {type(e).__name__}: {e}", stage=cls.__name__)
        return None
    return StageContract(i, cls, args, contract, valid, frozenset(bad))
