"""The stage graph of a checked model (`diffstage graph`): which Req fields flow from the request and
from each stage to the stages that read them, as Mermaid text or, with Graphviz, a PNG.

    graph = stage_graph(check_model("my_model"))      # nothing is loaded
    print(to_mermaid(graph))

A field a stage reads comes from the most recent earlier stage that writes it (also optionally), else
from the request; the contracts are those of the static check, callbacks' reads included."""
from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import DiffstageError, clipped

if TYPE_CHECKING:  # for annotations only: drawing a graph needs none of the builder's imports
    from .model_check import CheckedModel
    from .check import PlannedStage
    from .spec import ModelSpec

REQUEST = "request"  # id of the request's node; stages are stage0, stage1, ...
WIDTH = 48  # characters per line of a label: long field lists wrap instead of widening the chart

NEEDS_GRAPHVIZ = ("--png needs the graphviz Python package and Graphviz's `dot` program: pip install graphviz "
                  "(diffstage's `graph` extra) and the Graphviz system package (e.g. apt-get install graphviz, "
                  "brew install graphviz); without --png, diffstage graph prints Mermaid text, which needs neither")
NEEDS_DOT = ("--png needs Graphviz's `dot` program, which {why}: install the Graphviz system package (e.g. "
             "apt-get install graphviz, brew install graphviz); without --png, diffstage graph prints Mermaid "
             "text, which needs no Graphviz")


@dataclass(frozen=True)
class Node:
    id: str  # a Mermaid and DOT id: ASCII letters and numbers only
    lines: tuple[str, ...]  # the title, then details


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    fields: tuple[str, ...]  # the Req fields that flow along it, merged into one label


@dataclass(frozen=True)
class StageGraph:
    nodes: tuple[Node, ...]  # the request first, then the stages in order
    edges: tuple[Edge, ...]


def _unique(items) -> list:
    return list(dict.fromkeys(items))


def _stage_lines(planned: PlannedStage, spec: ModelSpec) -> tuple[str, ...]:
    lines = [f"stages[{planned.index}] {planned.cls.__name__}"]
    modules = ["every loaded module"] if planned.cls.takes_all_modules else _unique(planned.contract.modules.values())
    if modules:
        lines += _wrapped("modules: ", modules)
    # the callbacks the YAML binds for this stage (the stage's own defaults cover the rest)
    group = spec.pipeline_config.callbacks.get(planned.cls.callback_group(), {})
    bound = [c.name for c in planned.contract.callbacks if c.name in group]
    if bound:
        lines += _wrapped("callbacks: ", bound)
    return tuple(lines)


def _wrapped(prefix: str, names: list[str]) -> list[str]:
    return textwrap.wrap(prefix + ", ".join(names), WIDTH, break_long_words=False, break_on_hyphens=False)


def stage_graph(checked: CheckedModel) -> StageGraph:
    """Nodes and field edges of a model that passed check_model."""
    request_fields = checked.req_cls.request_fields()
    last_writer: dict[str, str] = {}
    flows: dict[tuple[str, str], list[str]] = {}  # (producer, consumer) -> fields, in order
    from_request: list[str] = []
    stages = []
    for planned in checked.plan:
        node = f"stage{planned.index}"
        contract = planned.contract
        for f in sorted(contract.reads | contract.optional_reads):
            source = last_writer.get(f) or (REQUEST if f in request_fields else None)
            if source is None:  # an optional read nothing supplies: no edge
                continue
            flows.setdefault((source, node), []).append(f)
            if source == REQUEST:
                from_request.append(f)
        for f in contract.writes | contract.optional_writes:
            last_writer[f] = node
        stages.append(Node(node, _stage_lines(planned, checked.spec)))
    request = Node(REQUEST, ("request", *_wrapped("", sorted(set(from_request)))))
    order = {node.id: n for n, node in enumerate((request, *stages))}
    # by consumer, then producer: each stage's inputs are listed together, the request's first
    pairs = sorted(flows, key=lambda pair: (order[pair[1]], order[pair[0]]))
    return StageGraph((request, *stages), tuple(Edge(s, t, tuple(flows[s, t])) for s, t in pairs))


# --- Mermaid ------------------------------------------------------------------------
# Mermaid's entity codes: a quote would end the label, '#' starts an entity, '<' and '>' would be
# HTML and '`' a Markdown label; control characters would break the line.
_MERMAID_ESCAPES = {"#": "#35;", '"': "#quot;", "<": "#60;", ">": "#62;", "`": "#96;", "|": "#124;"}


def _mermaid_text(lines) -> str:
    return "<br/>".join("".join(_MERMAID_ESCAPES.get(c, c) for c in _printable(line)) for line in lines)


def _printable(text: str) -> str:
    return re.sub(r"[\x00-\x1f\x7f]", " ", text)


def to_mermaid(graph: StageGraph) -> str:
    """A Mermaid flowchart, top to bottom: the request as a rounded node, one box per stage."""
    out = ["flowchart TD"]
    for node in graph.nodes:
        label = _mermaid_text(node.lines)
        out.append(f'    {node.id}(["{label}"])' if node.id == REQUEST else f'    {node.id}["{label}"]')
    for edge in graph.edges:
        label = _mermaid_text(_wrapped("", list(edge.fields)))
        out.append(f'    {edge.source} -->|"{label}"| {edge.target}')
    return "\n".join(out) + "\n"


# --- Graphviz -----------------------------------------------------------------------
def _dot_text(lines) -> str:
    """A DOT string: backslashes and quotes escaped, lines joined with DOT's own line break."""
    return '"' + "\\n".join(_printable(line).replace("\\", "\\\\").replace('"', '\\"') for line in lines) + '"'


def to_dot(graph: StageGraph) -> str:
    out = ["digraph stages {", '  node [shape=box, fontname="Helvetica"];', '  edge [fontname="Helvetica"];']
    for node in graph.nodes:
        style = ", style=rounded" if node.id == REQUEST else ""
        out.append(f"  {node.id} [label={_dot_text(node.lines)}{style}];")
    for edge in graph.edges:
        out.append(f"  {edge.source} -> {edge.target} [label={_dot_text(_wrapped('', list(edge.fields)))}];")
    return "\n".join(out + ["}"]) + "\n"


def render_png(graph: StageGraph) -> bytes:
    """The graph as PNG bytes, drawn by Graphviz's dot; DiffstageError saying what to install without it."""
    try:
        import graphviz
    except ImportError:
        raise DiffstageError(NEEDS_GRAPHVIZ) from None
    try:
        return graphviz.Source(to_dot(graph)).pipe(format="png", quiet=True)
    except graphviz.ExecutableNotFound:
        raise DiffstageError(NEEDS_DOT.format(why="was not found on PATH")) from None
    except (graphviz.CalledProcessError, OSError) as e:  # a dot that is there but broken
        stderr = getattr(e, "stderr", None)
        text = stderr.decode(errors="replace") if isinstance(stderr, bytes) else str(stderr or e)
        why = f"did not run ({clipped(text.strip().splitlines()[0] if text.strip() else type(e).__name__)})"
        raise DiffstageError(NEEDS_DOT.format(why=why)) from None
