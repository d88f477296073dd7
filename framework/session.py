"""Session: the one owner of what a process keeps between pipeline builds and runs.

The builder, the CLI and a server build their pipelines through a session: its module cache (modules
loaded once, keyed by file identity) and its stage-output cache (outputs reused by fingerprint) are
shared by those pipelines and by nothing else. A process has a default session; `Session()` makes a
separate one (a test, or a server tenant that must not see another's cache). What belongs to one run
(a step cache's residuals) lives with the run, not here; the parallel layout (`parallel`) is the process's,
as torch.distributed's process group is."""
from __future__ import annotations

import threading

from .module_cache import ModuleCache
from .reuse import ReuseCache


class Session:
    def __init__(self) -> None:
        self.modules = ModuleCache()
        self.reuse = ReuseCache()  # each pipeline stores within its own reuse.max_mb (see ReuseCache.put)

    @property
    def parallel(self):
        """The process's parallel layout (rank, world size, groups): one per process, set by init_parallel."""
        from .distributed import current

        return current()

    def clear(self) -> None:
        """Forget every loaded module and reused output (pipelines already built keep theirs)."""
        self.modules.clear()
        self.reuse.clear()


_default: Session | None = None
_default_lock = threading.Lock()


def default_session() -> Session:
    """The process's session: what build_pipeline, PipelineBuilder.build and the CLI use unless given one."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Session()
        return _default
