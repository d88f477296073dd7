"""Write what a command reports (output paths, listings) to stdout, so that a stdout that cannot be written
(a full disk, a closed file) is named as the cause instead of ending in a traceback or blaming another file."""
from __future__ import annotations

import sys
from typing import Any

from .errors import OutputError


class StdoutError(OutputError):
    """Standard output cannot be written."""


def say(*values: Any, end: str = "\n") -> None:
    """print(...) to stdout, flushed; a write error raises StdoutError (a closed pipe stays BrokenPipeError,
    which the command treats as the reader leaving)."""
    try:
        print(*values, end=end, file=sys.stdout, flush=True)
    except BrokenPipeError:
        raise
    except OSError as e:
        raise StdoutError(f"cannot write to standard output: {e.strerror or e}") from None
