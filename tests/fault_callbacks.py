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
    """As `pack`, except that a prompt of "vanish" ends the process at once, as a killed worker would."""
    if "vanish" in req.prompts():
        import os

        os._exit(3)
    return pack(latents, req, settings)
