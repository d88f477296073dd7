"""The parallel layout of a run: how many processes, and which do CFG, Ulysses and Ring parallelism.

Launch with torch's own launcher; each process reads its rank from torchrun's environment:

    torchrun --nproc-per-node=4 -m diffstage generate parallel.ulysses=2 parallel.ring=2

The world is a 3-D mesh cfg x ring x ulysses (Ulysses innermost, so its all-to-alls stay between
neighbouring ranks, which share the fastest links). Every rank holds every module: text encoders and
the VAE run on each rank (they are small next to the transformer), and only rank 0 writes files."""
from __future__ import annotations

import atexit

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch

from ..environment import env_int
from ..errors import DiffstageError, shown

MODES = ("cfg", "ulysses", "ring")
MAX_TIMEOUT = 7 * 24 * 3600  # seconds; timedelta and the process group take far more, nobody waits longer


def dist_timeout() -> timedelta:
    """How long a rank waits for the others (DIFFSTAGE_DIST_TIMEOUT, seconds): a stuck rank ends the run."""
    return timedelta(seconds=env_int("DIFFSTAGE_DIST_TIMEOUT", 300, 1, MAX_TIMEOUT, "seconds",
                                     "how long a rank waits for the others"))


@dataclass
class ParallelState:
    """This process's place in the mesh, and the process groups it talks over."""

    cfg: int = 1
    ulysses: int = 1
    ring: int = 1
    rank: int = 0
    world_size: int = 1
    groups: dict[str, Any] = field(default_factory=dict)  # "cfg", "ulysses", "ring", "sequence" -> group
    ranks: dict[str, list[int]] = field(default_factory=dict)  # the global ranks of each of this rank's groups

    @property
    def sequence(self) -> int:
        """Processes that share one sequence (Ulysses x Ring)."""
        return self.ulysses * self.ring

    def index(self, mode: str) -> int:
        """This rank's position within its `mode` group."""
        return self.ranks[mode].index(self.rank)


_STATE = ParallelState()


def current() -> ParallelState:
    return _STATE


def is_main_process() -> bool:
    """Rank 0 writes files and prints; the others stay quiet."""
    return _STATE.rank == 0


def _degrees(options: dict) -> dict[str, int]:
    problems, degrees = [], {}
    for mode in MODES:
        value = (options or {}).get(mode, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            problems.append(f"parallel.{mode} must be a positive integer, got {shown(value)}")
        degrees[mode] = value
    unknown = sorted(set(options or {}) - set(MODES))
    problems += [f"unknown key 'parallel.{k}'; known: {', '.join(MODES)}" for k in unknown]
    if problems:
        raise DiffstageError("invalid parallel config:\n" + "\n".join(f"  - {p}" for p in problems))
    return degrees


def launched_world() -> tuple[int, int] | None:
    """(rank, world size) from torchrun's environment, or None when not launched by it."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return None
    world = env_int("WORLD_SIZE", 1, 1, why="torchrun sets it: the number of processes")
    rank = launched_rank()
    if rank >= world:
        raise DiffstageError(f"environment variable RANK={shown(os.environ['RANK'])}: expected a whole number "
                             f"below WORLD_SIZE={world} (torchrun sets both)")
    return rank, world


def launched_rank() -> int:
    """This process's rank from torchrun's environment (0 when not launched by it)."""
    return env_int("RANK", 0, 0, why="torchrun sets it: this process's index")


def check_layout(options: dict) -> dict[str, int]:
    """The degrees, checked against how the process was launched (before anything loads)."""
    degrees = _degrees(options)
    product = degrees["cfg"] * degrees["ulysses"] * degrees["ring"]
    launched = launched_world()
    settings = " ".join(f"parallel.{m}={degrees[m]}" for m in MODES if degrees[m] > 1)
    if launched is None:
        if product > 1:
            raise DiffstageError(f"{settings} runs on {product} processes: launch it with torchrun, e.g. "
                                 f"torchrun --nproc-per-node={product} -m diffstage generate ... {settings}")
        return degrees
    if product != launched[1]:
        raise DiffstageError(f"the parallel degrees multiply to {product} (cfg {degrees['cfg']} x ulysses "
                             f"{degrees['ulysses']} x ring {degrees['ring']}), but torchrun started {launched[1]} "
                             f"processes; make them match (--nproc-per-node={product}, or degrees whose product is "
                             f"{launched[1]})")
    if degrees["cfg"] > 2:
        raise DiffstageError(f"parallel.cfg is {degrees['cfg']}: CFG has two branches, so it is 1 or 2")
    return degrees


def _destroy_process_group() -> None:
    """At exit, the process group init_parallel made, as PyTorch asks: a process that exits with it alive can
    abort in its teardown ("terminate called without an active exception"), which torchrun reports as a failure."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def init_parallel(options: dict, device: torch.device) -> ParallelState:
    """Join the process group torchrun set up (gloo on CPU, NCCL on CUDA) and make the mesh's groups.
    Without torchrun and with all degrees 1, nothing happens."""
    global _STATE
    degrees = check_layout(options)
    launched = launched_world()
    if launched is None:
        _STATE = ParallelState()
        return _STATE
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(env_int("LOCAL_RANK", 0, 0,
                                          why="torchrun sets it: this process's index on its machine"))
        dist.init_process_group(backend, timeout=dist_timeout())
        atexit.register(_destroy_process_group)  # the group's threads end before the interpreter's teardown
    rank, world = dist.get_rank(), dist.get_world_size()
    state = ParallelState(degrees["cfg"], degrees["ulysses"], degrees["ring"], rank, world)
    u, r = degrees["ulysses"], degrees["ring"]
    coords = {g: (g // (r * u), (g // u) % r, g % u) for g in range(world)}  # global rank -> (cfg, ring, ulysses)
    mine = coords[rank]
    layouts = {"cfg": lambda c: (c[1], c[2]), "ring": lambda c: (c[0], c[2]), "ulysses": lambda c: (c[0], c[1]),
               "sequence": lambda c: (c[0],)}
    for mode, key in layouts.items():
        # every rank makes every group, in the same order, as torch.distributed requires
        members: dict[tuple, list[int]] = {}
        for g in range(world):
            members.setdefault(key(coords[g]), []).append(g)
        for ranks in members.values():
            group = dist.new_group(ranks) if world > 1 else None
            if rank in ranks:
                state.groups[mode], state.ranks[mode] = group, ranks
    _STATE = state
    return state


def reset() -> None:
    """Back to one process (tests)."""
    global _STATE
    _STATE = ParallelState()
