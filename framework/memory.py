"""How much memory a request needs, and how much there is, before anything large is allocated.

Stages estimate what they will allocate (`PipelineStage.memory_estimate`); the pipeline adds
the estimates up and refuses a request that cannot fit, instead of letting the allocator or
the kernel's OOM killer end the run minutes later. The estimates are deliberately rough
(the largest activations, not every temporary): their job is to catch requests that are off
by orders of magnitude (an 8192x8192 image of a 32x32 model, 100,000 images in one batch)."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from .errors import RequestError


def format_bytes(n: int | float) -> str:
    n = int(n)  # estimates can exceed a float's range: stay in integers
    if n >= 1024 ** 6:
        return "more than 1 EiB"
    units = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
    i = 0
    while i < len(units) - 1 and n >= 1024 ** (i + 1):
        i += 1
    return f"{n} B" if i == 0 else f"{n / 1024 ** i:.1f} {units[i]}"


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def available_bytes(device: torch.device | str = "cpu") -> int | None:
    """Free memory on `device` now: CUDA's free memory, or the host's MemAvailable (capped by a cgroup
    limit when there is one). None when it cannot be told."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    free = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    limit, used = _read_int("/sys/fs/cgroup/memory.max"), _read_int("/sys/fs/cgroup/memory.current")
    if limit is not None and used is not None:
        free = min(free, limit - used) if free is not None else limit - used
    return free


def config_value(module, *names: str):
    """The first of `names` in a module's config (Diffusers' and Transformers' configs alike)."""
    config = getattr(module, "config", None)
    for name in names:
        value = config.get(name) if isinstance(config, dict) else getattr(config, name, None)
        if value is not None:
            return value
    return None


def check_fits(estimates: dict[str, int], device: torch.device | str, where: str = "") -> None:
    """Raise RequestError when the estimated total exceeds the free memory of `device`."""
    total = sum(estimates.values())
    free = available_bytes(device)
    if free is None or total <= free:
        return
    parts = ", ".join(f"{name} {format_bytes(n)}" for name, n in sorted(estimates.items(), key=lambda kv: -kv[1]))
    raise RequestError(f"this request needs about {format_bytes(total)} of memory ({parts}), but about "
                       f"{format_bytes(max(free, 0))} is free on {torch.device(device)}{where}; lower height/width or "
                       "num_images_per_prompt (or generate in several calls)")


def numel(shape) -> int:
    return math.prod(int(d) for d in shape)
