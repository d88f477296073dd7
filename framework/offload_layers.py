"""runtime.offload=layers: a transformer's repeated blocks kept on the CPU and streamed to the GPU one at a time.

Everything but the blocks moves to the GPU once. Each block's tensors stay in pinned CPU memory; a forward
pre-hook on block i makes sure its copy on the GPU is there (waiting for the copy stream) and starts copying
block i+1 on a side stream, so the next block's transfer overlaps this block's compute; a forward hook drops
block i's GPU copy after it ran. GPU memory then holds the non-block weights plus two blocks.

The blocks: a native model's `repeated_blocks` (ModuleList names), else the ModuleLists whose blocks' classes a
stock Diffusers model names in `_repeated_blocks`, else every ModuleList of two or more modules. Written for CUDA
and untested where no GPU is available; the ordering logic also runs with device="cpu" (plain copies, no
stream), which the tests use."""
from __future__ import annotations

import contextlib
from typing import Any

import torch

from .errors import DiffstageError


def repeated_blocks(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The module's repeated blocks in the order a forward runs them (the lists in declaration order)."""
    names = getattr(module, "repeated_blocks", None)
    if names:
        return [block for name in names for block in getattr(module, name)]
    classes = set(getattr(module, "_repeated_blocks", None) or ())
    lists = [m for m in module.modules() if isinstance(m, torch.nn.ModuleList)]
    if classes:
        lists = [m for m in lists if any(type(b).__name__ in classes for b in m)]
    return [block for m in lists if len(m) >= 2 for block in m]


def _tensors(block: torch.nn.Module) -> list[tuple[dict, str]]:
    return [(holder, key) for sub in block.modules() for holder in (sub._parameters, sub._buffers)
            for key, value in holder.items() if value is not None]


class BlockStreamer:
    """Streams `module`'s repeated blocks to `device` around each block's forward (see the module docstring).
    `events` (when a list is given) records ("fill", i) / ("empty", i) / ("run", i) in order, for tests."""

    def __init__(self, module: torch.nn.Module, device: torch.device | str, events: list | None = None):
        self.device = torch.device(device)
        self.blocks = repeated_blocks(module)
        if not self.blocks:
            raise DiffstageError(f"runtime.offload=layers: {type(module).__name__} has no repeated blocks to stream "
                                 "(no repeated_blocks, _repeated_blocks or ModuleList of blocks); use offload=model")
        self.events = events
        cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if cuda else None
        in_blocks = {id(t) for block in self.blocks for holder, key in _tensors(block) for t in [holder[key]]}
        for sub in module.modules():  # the rest of the model lives on the device
            for holder in (sub._parameters, sub._buffers):
                for key, value in holder.items():
                    if value is not None and id(value) not in in_blocks:
                        holder[key] = _like(value, value.data.to(self.device))
        # each block's tensors on the host (pinned: the copies to the GPU can be asynchronous)
        self.host = [[_like(holder[key], holder[key].data.to("cpu").pin_memory() if cuda else holder[key].data)
                      for holder, key in _tensors(block)] for block in self.blocks]
        for index, block in enumerate(self.blocks):
            for (holder, key), value in zip(_tensors(block), self.host[index]):
                holder[key] = value
            block.register_forward_pre_hook(lambda m, args, i=index: self._before(i))
            block.register_forward_hook(lambda m, args, out, i=index: self._after(i))
        self.ready: dict[int, Any] = {}  # block index -> the event its copy on the device is done at (or None)

    def _fill(self, index: int) -> None:
        """Start copying block `index` to the device (on the side stream)."""
        if index in self.ready:
            return
        self._record("fill", index)
        stream = self.stream
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            for (holder, key), host in zip(_tensors(self.blocks[index]), self.host[index]):
                holder[key] = _like(host, host.data.to(self.device, non_blocking=stream is not None))
            self.ready[index] = torch.cuda.Event() if stream is not None else None
            if stream is not None:
                self.ready[index].record(stream)

    def _before(self, index: int) -> None:
        self._fill(index)
        event = self.ready[index]
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
            for holder, key in _tensors(self.blocks[index]):  # used on the compute stream: freed after it
                holder[key].data.record_stream(torch.cuda.current_stream(self.device))
        self._fill((index + 1) % len(self.blocks))  # prefetch (after the last: the first, for the next call)
        self._record("run", index)

    def _after(self, index: int) -> None:
        for (holder, key), host in zip(_tensors(self.blocks[index]), self.host[index]):
            holder[key] = host
        self.ready.pop(index, None)
        self._record("empty", index)

    def _record(self, what: str, index: int) -> None:
        if self.events is not None:
            self.events.append((what, index))


def _like(old: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    """`data` as the same kind of tensor as `old` (a Parameter stays a Parameter)."""
    return torch.nn.Parameter(data, requires_grad=False) if isinstance(old, torch.nn.Parameter) else data
