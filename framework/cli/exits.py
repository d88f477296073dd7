"""How a user's error ends the command: "error: MESSAGE" on stderr and exit status 2, no traceback (with
DIFFSTAGE_DEBUG=1 the error is raised instead, to show it). Its own module so that every command module can
use it without importing the dispatch back."""
from __future__ import annotations

import os
import sys


def debug() -> bool:
    return os.environ.get("DIFFSTAGE_DEBUG", "") not in ("", "0")


def fail(err: Exception) -> None:
    if debug():
        raise err
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)
