"""Write what a command reports (output paths, listings) to stdout, so that a stdout that cannot be written
(a full disk, a closed file) is named as the cause instead of ending in a traceback or blaming another file."""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Any

from .errors import OutputError


class StdoutError(OutputError):
    """Standard output cannot be written."""


def _guarded(write, *args):
    """write(*args), its OSError as StdoutError (a closed pipe stays BrokenPipeError, which the command treats
    as the reader leaving)."""
    try:
        return write(*args)
    except BrokenPipeError:
        raise
    except OSError as e:
        raise StdoutError(f"cannot write to standard output: {e.strerror or e}") from None


def say(*values: Any, end: str = "\n") -> None:
    """print(...) to stdout, flushed; a write error raises StdoutError."""
    _guarded(lambda: print(*values, end=end, file=sys.stdout, flush=True))


class _GuardedStdout:
    """sys.stdout for the length of a command: what others print (Hydra's --cfg, --help) that cannot be written
    raises StdoutError too, instead of an OSError blamed on whatever was being done (the run directory)."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        return _guarded(self._stream.write, text)

    def flush(self):
        return _guarded(self._stream.flush)

    def __getattr__(self, name):
        return getattr(self._stream, name)


@contextmanager
def guarded_stdout():
    """Within: a stdout write error is StdoutError; on leaving, what is buffered is flushed (at exit Python
    could only print a note and exit 120)."""
    original = sys.stdout
    sys.stdout = _GuardedStdout(original)
    try:
        yield
        sys.stdout.flush()
    finally:
        sys.stdout = original
