"""Regional compilation of a stock module: its declared repeated blocks compiled one at a time
(`runtime.compile`), as diffstage's native transformers compile theirs. One block's graph serves every block
of its class, so the compile takes the time of one block, not of the whole model."""
from __future__ import annotations

import logging
from typing import Any

import torch

from .block_cache import block_lists
from .forward_args import Locate
from .hardware import auto_compile

log = logging.getLogger(__name__)


def compile_blocks(module: torch.nn.Module, declaration: Any, locate: Locate, option: Any,
                   planned_images: int | None) -> bool:
    """Compile the blocks `declaration` names (default: the class's _repeated_blocks) when `option` (the run's
    runtime.compile: true, false or auto) says so; returns whether they are compiled."""
    if option is not True and option != "auto":
        return False
    if option == "auto":
        params = sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))
        option, why = auto_compile(planned_images, params)
        log.info("%s: compile=%s (%s)", type(module).__name__, str(option).lower(), why)
        if not option:
            return False
    for blocks in block_lists(module, declaration.blocks, locate):
        for block in blocks:
            if getattr(block, "_compiled_call_impl", None) is None:  # a shared module compiled by another build
                block.compile(dynamic=True)
    return True
