"""Callbacks for the fault tests: the digits model's own `pack`, except that a prompt of "explode" makes it
raise, as a stage with a bug would (inside the pipeline, after the request passed its checks), one of "oom"
runs out of memory, and one of "vanish" ends the process (the sweep launcher tests)."""
import os
import time
from pathlib import Path

from diffstage.models.flux.callbacks import pack
from diffstage.sweep import read_rows


def pack_or_explode(latents, req, settings):
    if "explode" in req.prompts():
        raise ValueError("boom: this prompt breaks the stage")
    if "oom" in req.prompts():
        raise MemoryError("cannot allocate the latents")
    return pack(latents, req, settings)


def pack_or_vanish(latents, req, settings):
    """As `pack`, except that a prompt of "vanish" ends the process at once, as a killed worker would.

    If DIFFSTAGE_TEST_VANISH_AFTER names a sweep directory, the process first waits (up to a minute) for another
    job there to succeed: a launcher may stop every worker once one dies, and the test wants one job to finish."""
    if "vanish" in req.prompts():
        sweep_dir = os.environ.get("DIFFSTAGE_TEST_VANISH_AFTER")
        deadline = time.monotonic() + 60
        while sweep_dir and time.monotonic() < deadline:
            if any(row["error"] is None for row in read_rows(Path(sweep_dir))):
                break
            time.sleep(0.1)
        os._exit(3)
    return pack(latents, req, settings)
