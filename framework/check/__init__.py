"""The static contract check: runs on the raw YAML data before any weight loads.

Walks the stages in order with the set of Req fields available so far and
reports, all at once: unresolvable or disallowed targets, stage arguments the
stage does not take (or of the wrong type), unknown module names, fields a stage
reads that nothing produces, missing callbacks, and callbacks nothing calls.

One concern a module: targets.py (dotted paths through the allowlist, stage arguments against the
class's signature, module names), contracts.py (the first pass: every stage's contract), fields.py (which
fields each stage reads and writes, in order), callbacks.py (the callback groups and what they read);
records.py holds what the passes hand each other, context.py what they share. The passes run in the
order check_contracts lists them; check_data sorts the problems by file, line and key, and this order breaks ties."""
from __future__ import annotations

from collections.abc import Iterable

from ..errors import Problem
from ..stage import PipelineStage
from ..yaml_lines import LineMap
from .callbacks import callback_reads, called_callbacks, check_callbacks
from .context import Context
from .contracts import stage_contracts
from .fields import FieldNames, Written, check_output, check_reads, check_writes, field_names, planned, stage_reads
from .records import Contracts, PlannedStage
from .targets import (check_attention, check_module_refs, check_module_targets, check_unused_modules,
                      stage_signature)

__all__ = ["PlannedStage", "check_contracts", "stage_signature"]


def check_contracts(data: dict, file: str, lines: LineMap, allowlist: Iterable[str],
                    known_stages: Iterable[type[PipelineStage]]
                    ) -> tuple[list[PlannedStage], list[Problem], dict[str, str]]:
    """(the stages that passed, every problem, the state fields the stages declare: name -> doc)."""
    ctx = Context(data, file, lines, tuple(allowlist), tuple(known_stages))
    stages = data.get("stages")
    if not isinstance(stages, list):
        return [], ctx.problems, {}
    modules = set(ctx.mapping("modules"))
    given_callbacks = ctx.mapping("pipeline_config", "callbacks")
    check_attention(ctx)
    found = stage_contracts(ctx, stages)
    names = field_names(ctx, found)
    plan = _walk(ctx, found, names, modules, given_callbacks)
    check_callbacks(ctx, given_callbacks, called_callbacks(found.stages), found.certain)
    check_module_targets(ctx)
    if found.certain:
        check_output(ctx, found, names)
        check_unused_modules(ctx, modules, found.stages)
    return plan, ctx.problems, names.declared


def _walk(ctx: Context, found: Contracts, names: FieldNames, modules: set[str],
          given_callbacks: dict) -> list[PlannedStage]:
    """Stage by stage, in order, with what earlier stages write: the modules each stage names, and the fields
    it and its callbacks read and write. The stages with valid arguments make the plan."""
    written = Written(set(names.request), set())
    plan = []
    for entry in found.stages:
        check_module_refs(ctx, entry, modules)
        reads = stage_reads(entry, callback_reads(ctx, entry, given_callbacks))
        check_reads(ctx, entry, reads, names, found, written)
        check_writes(ctx, entry, names)
        written.add(entry)
        if entry.valid:
            plan.append(planned(entry, reads))
    return plan
