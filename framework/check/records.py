"""What the contract check knows about the stages: each stage's contract as the first pass found it, and
the stages that passed, as the builder will construct them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..stage import Contract, PipelineStage


@dataclass
class PlannedStage:
    """A stage that passed the check: its class, YAML args and contract."""

    index: int
    cls: type[PipelineStage]
    args: dict[str, Any]
    contract: Contract


@dataclass(frozen=True)
class StageContract:
    """A stage whose contract is known. A stage with invalid arguments still has one (from its valid
    arguments), so one typo does not cascade into "nothing writes X" problems further down."""

    index: int
    cls: type[PipelineStage]
    args: dict[str, Any]  # as the YAML gives them, without _target_ and _name_
    contract: Contract
    valid: bool  # every argument is valid: the stage can be built
    invalid_values: frozenset[str]  # arguments whose values are invalid: the contract may depend on them


@dataclass(frozen=True)
class Contracts:
    """Every stage's contract that is known, found before the walk over the fields."""

    stages: list[StageContract]
    first_unknown: int  # index of the first stage whose contract is unknown or may be wrong (else the count)
    count: int  # stages in the YAML
    writers: dict[str, list[int]]  # field -> indexes of the stages that write it, in order
    reads_of: dict[int, frozenset[str]]  # stage index -> the fields it reads

    @property
    def certain(self) -> bool:
        """Every stage's needs are known: what is missing or unused can be judged for the whole pipeline."""
        return self.first_unknown == self.count
