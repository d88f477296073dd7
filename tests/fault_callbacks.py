"""A callback for the server's fault tests: the digits model's own `pack`, except that a prompt of "explode"
makes it raise, as a stage with a bug would (inside the pipeline, after the request passed its checks), and
one of "oom" runs out of memory."""
from diffstage.models.flux.callbacks import pack


def pack_or_explode(latents, req, settings):
    if "explode" in req.prompts():
        raise ValueError("boom: this prompt breaks the stage")
    if "oom" in req.prompts():
        raise MemoryError("cannot allocate the latents")
    return pack(latents, req, settings)


def pack_or_vanish(latents, req, settings):
    """As `pack`, except that a prompt of "vanish" ends the process at once, as a killed worker would.

    If DIFFSTAGE_TEST_VANISH_AFTER names a sweep row file, the process first waits (up to a minute) for that
    job to report: a launcher may stop every worker once one dies, and the test wants one job to finish."""
    if "vanish" in req.prompts():
        import os

        _wait_for_row(os.environ.get("DIFFSTAGE_TEST_VANISH_AFTER"))
        os._exit(3)
    return pack(latents, req, settings)


def _wait_for_row(path, timeout=60.0):
    import json
    import time
    from pathlib import Path

    from diffstage.sweep import UNFINISHED

    deadline = time.monotonic() + timeout
    while path and time.monotonic() < deadline:
        try:
            if json.loads(Path(path).read_text()).get("error") != UNFINISHED:
                return
        except (OSError, ValueError):
            pass  # not written yet
        time.sleep(0.1)
