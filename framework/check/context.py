"""What every pass of the contract check shares: the YAML being checked, the allowlists, and the problems
found so far (in the order they are found)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import Problem
from ..resolve import callback_allowlist
from ..stage import PipelineStage
from ..yaml_lines import LineMap, format_key


@dataclass
class Context:
    """One check's inputs and its problems; passes add to `problems` through `add`, never remove."""

    data: dict
    file: str
    lines: LineMap
    allowlist: tuple[str, ...]
    known_stages: tuple[type[PipelineStage], ...]
    problems: list[Problem] = field(default_factory=list)
    callbacks: tuple[str, ...] = field(init=False)  # where callbacks may come from (a narrower allowlist)

    def __post_init__(self) -> None:
        self.callbacks = callback_allowlist(self.allowlist)

    def add(self, path: tuple, message: str, hint: str | None = None, stage: str | None = None) -> None:
        file, line = self.lines.where(path)
        self.problems.append(Problem(message, key=format_key(path), file=file or self.file,
                                     line=line, hint=hint, stage=stage))

    def mapping(self, *path) -> dict:
        """The mapping at `path` in the YAML, or {} when it is missing or not a mapping (the schema says so)."""
        node: Any = self.data
        for p in path:
            node = node.get(p) if isinstance(node, dict) else None
        return node if isinstance(node, dict) else {}
