"""Field flow: the Req fields each stage (and each callback bound to it) reads and writes, in pipeline
order: which are not fields at all, which nothing earlier provides, and whether anything writes 'output'."""
from __future__ import annotations

from dataclasses import dataclass, replace

from ..errors import did_you_mean
from ..req import Req
from .callbacks import CallbackRead
from .context import Context
from .records import Contracts, PlannedStage, StageContract


@dataclass(frozen=True)
class FieldNames:
    """The field names the walk judges reads and writes against, known before it starts."""

    request: frozenset[str]  # what a request supplies: Req's request fields and the YAML's request_fields
    declared: dict[str, str]  # the state fields stages add to the Req: name -> doc
    known: frozenset[str]  # every field a stage may read or write


def field_names(ctx: Context, found: Contracts) -> FieldNames:
    yaml_request = {n for n in ctx.mapping("request_fields") if isinstance(n, str) and n.isidentifier()}
    request = Req.request_fields() | yaml_request
    declared = _declared_state(ctx, found.stages, request)
    return FieldNames(frozenset(request), declared, frozenset(Req.field_names() | yaml_request | set(declared)))


def _declared_state(ctx: Context, stages: list[StageContract], request: set[str]) -> dict[str, str]:
    """The state fields stages add to the Req (name -> doc); a name that is already a field is refused."""
    declared: dict[str, str] = {}
    for entry in stages:
        for name, doc in entry.contract.declares.items():
            if name in Req.field_names() or name in request or not name.isidentifier():
                what = "is already a Req field" if name.isidentifier() else "is not a Python identifier"
                ctx.add(("stages", entry.index), f"declares the new field '{name}', which {what}",
                        stage=entry.cls.__name__)
            else:
                declared.setdefault(name, doc)
    return declared


@dataclass(frozen=True)
class FieldRead:
    """A field a stage, or a callback bound to it, reads, and the YAML key that says so."""

    field: str
    path: tuple
    what: str  # "reads" for the stage, "callback 'group.name' reads" for a callback


@dataclass(frozen=True)
class StageReads:
    """What a stage needs before it runs, and what it reads only if present."""

    needed: list[FieldRead]
    optional: list[FieldRead]


def stage_reads(entry: StageContract, callbacks: list[CallbackRead]) -> StageReads:
    """The stage's reads, then its callbacks' (a field the stage reads itself is reported once, for the stage)."""
    contract, at = entry.contract, ("stages", entry.index)
    own = contract.reads | contract.optional_reads
    needed = [FieldRead(f, at, "reads") for f in sorted(contract.reads)] + \
        [FieldRead(r.field, r.path, f"callback '{r.callback}' reads") for r in callbacks
         if not r.optional and r.field not in contract.reads]
    optional = [FieldRead(f, at, "reads") for f in sorted(contract.optional_reads)] + \
        [FieldRead(r.field, r.path, f"callback '{r.callback}' reads") for r in callbacks
         if r.optional and r.field not in own]
    return StageReads(needed, optional)


@dataclass
class Written:
    """What the stages before the current one write, growing as the walk goes (the request's fields first)."""

    surely: set[str]
    maybe: set[str]  # optional writes of earlier stages

    def add(self, entry: StageContract) -> None:
        self.surely |= entry.contract.writes
        self.maybe |= entry.contract.optional_writes


def check_reads(ctx: Context, entry: StageContract, reads: StageReads, names: FieldNames, found: Contracts,
                before: Written) -> None:
    i, stage = entry.index, entry.cls.__name__
    for r in reads.needed + reads.optional:
        if r.field not in names.known:
            ctx.add(r.path, f"{r.what} '{r.field}', which is not a Req field", stage=stage,
                    hint=did_you_mean(r.field, names.known))
    for r in reads.needed:
        # an unknown stage could write anything: only judge stages before it. A callback may
        # also read what its own stage writes (the stage calls it after writing those), and what
        # an earlier stage may write (whether it does can depend on that stage's callbacks).
        also = before.maybe | entry.contract.writes if r.path != ("stages", i) else frozenset()
        if i < found.first_unknown and r.field in names.known and r.field not in before.surely \
                and r.field not in also:
            ctx.add(r.path, f"{r.what} '{r.field}' but no earlier stage writes it and the request does not "
                            "supply it", stage=stage, hint=_producers_hint(ctx, found, r.field, i))


def _producers_hint(ctx: Context, found: Contracts, f: str, i: int) -> str:
    later = [j for j in found.writers.get(f, []) if j > i and f not in found.reads_of.get(j, ())]
    if later:
        return f"stages[{later[0]}] writes it: move that stage before stages[{i}]"
    producers = sorted({c.__name__ for c in ctx.known_stages
                        if f in (*c.writes, *c.optional_writes) and f not in c.reads})
    if producers:
        return f"add a stage that writes it before stages[{i}], e.g. {', '.join(producers)}"
    return "no known stage writes it; add one that does"


def check_writes(ctx: Context, entry: StageContract, names: FieldNames) -> None:
    for f in sorted(entry.contract.writes | entry.contract.optional_writes):
        if f not in names.known:
            ctx.add(("stages", entry.index), f"writes '{f}', which is not a Req field", stage=entry.cls.__name__,
                    hint=did_you_mean(f, names.known) or "a stage that adds a field lists it in "
                                                         "its contract's `declares`")


def check_output(ctx: Context, found: Contracts, names: FieldNames) -> None:
    written = names.request.union(*(entry.contract.writes for entry in found.stages))
    if "output" not in written:
        ctx.add(("stages",), "no stage writes 'output', so the pipeline would produce nothing",
                hint="end the pipeline with a stage that writes it, e.g. DecodingStage")


def planned(entry: StageContract, reads: StageReads) -> PlannedStage:
    """The stage as the builder constructs it: its callbacks' reads join the stage's, but for what the stage
    writes before calling them."""
    contract = entry.contract
    contract = replace(contract, reads=contract.reads | ({r.field for r in reads.needed} - contract.writes),
                       optional_reads=contract.optional_reads
                       | ({r.field for r in reads.optional} - contract.writes))
    return PlannedStage(entry.index, entry.cls, entry.args, contract)
