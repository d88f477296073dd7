"""InputValidationStage: range-check the request and decide on guidance, before any work."""
from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field

from diffstage.errors import RequestError, StageError, shown
from diffstage.req import Req, unrecorded
from diffstage.stage import CallbackSpec, PipelineStage

CFG_SCALE_FIELDS = ("guidance_scale", "true_cfg_scale")
# What torch.Generator.manual_seed accepts (a negative seed wraps around, as in torch).
SEED_MIN, SEED_MAX = -(2 ** 63), 2 ** 64 - 1
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# Bounds that keep sizes well inside int64 arithmetic; the memory check refuses far less than these.
MAX_SIDE, MAX_IMAGES = 65536, 4096
MAX_SCALE = 1000.0  # guidance scales in use are < 30; beyond this float32 activations overflow
MAX_PROMPT_CHARS = 100_000  # encoders truncate to a few hundred tokens; a huge prompt only costs time


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class InputValidationStage(PipelineStage):
    """Checks sizes, steps and prompts; seeds the generator; decides whether CFG runs.

    Args:
        multiple_of: height and width must be positive multiples of this.
        max_steps: upper bound for num_inference_steps.
        max_sequence_length_limit: upper bound for max_sequence_length, if any.
        cfg_scale_field: the request field that holds the CFG scale
            (`true_cfg_scale` for guidance-distilled models, which embed guidance_scale).
        cfg_needs_negative_prompt: CFG only runs when a negative prompt is given
            (otherwise the empty prompt is the negative).

    A request that leaves height or width unset gets them from the `output_size` callback, when the
    YAML sets one (an editing model's output follows its input image); otherwise they are required.
    """

    reads = ("prompt", "num_inference_steps", "height", "width")
    optional_reads = ("seed", "negative_prompt", "guidance_scale", "true_cfg_scale", "max_sequence_length")
    writes = ("batch_size", "generator", "do_cfg", "cfg_scale")
    callback_specs = (
        CallbackSpec("output_size", ("req", "settings"),
                     doc="returns (height, width) for a request that leaves them unset, e.g. from its input image "
                         "(default: none; height and width are then required)"),
    )

    def __init__(self, multiple_of: Annotated[int, Field(ge=1)] = 1, max_steps: Annotated[int, Field(ge=1)] = 1000,
                 max_sequence_length_limit: Annotated[int, Field(ge=1)] | None = None,
                 cfg_scale_field: Literal["guidance_scale", "true_cfg_scale"] = "guidance_scale",
                 cfg_needs_negative_prompt: bool = True):
        super().__init__()
        self.multiple_of = multiple_of
        self.max_steps = max_steps
        self.max_sequence_length_limit = max_sequence_length_limit
        self.cfg_scale_field = cfg_scale_field
        self.cfg_needs_negative_prompt = cfg_needs_negative_prompt

    def required_reads(self) -> tuple[str, ...]:
        return ()  # request_problems() reports missing fields together with every other problem

    @staticmethod
    def default_output_size(req, settings):
        return None

    def complete_request(self, req: Req) -> None:
        if req.height is not None and req.width is not None:
            return
        # unbound (the stage built by hand, as it could be before it took a callback): no size callback
        size = self.callback("output_size")(req, self.settings) if self.bound_callbacks() else None
        if size is None:
            return
        if not (isinstance(size, (tuple, list)) and len(size) == 2 and all(_is_int(v) for v in size)):
            raise StageError(f"{type(self).__name__}: the output_size callback must return (height, width) as "
                             f"two integers, got {shown(size)}")
        req.height = size[0] if req.height is None else req.height
        req.width = size[1] if req.width is None else req.width

    def forward(self, req: Req) -> Req:
        self.complete_request(req)  # a stage run on its own, outside a Pipeline
        with unrecorded():  # checking every setting is no use of any (setting_use.py)
            errors = self.request_problems(req)
        if errors:
            raise RequestError("invalid request:\n" + "\n".join(f"  - {e}" for e in errors))

        req.batch_size = req.requested_batch_size()
        # seed=N means what Diffusers' torch.Generator("cpu").manual_seed(N) means.
        req.generator = torch.Generator("cpu")
        if req.seed is not None:
            req.generator.manual_seed(first_seed(req.seed))
        else:
            req.seed = int(req.generator.seed())
        scale = getattr(req, self.cfg_scale_field)
        req.cfg_scale = float(scale) if scale is not None else 1.0
        has_negative = req.negative_prompt is not None or not self.cfg_needs_negative_prompt
        req.do_cfg = bool(req.cfg_scale > 1.0 and has_negative)
        return req

    def request_problems(self, req: Req) -> list[str]:
        """Every problem with the request, so the caller can fix them in one go."""
        errors = []
        prompts = req.prompts()
        if not prompts or not all(isinstance(p, str) for p in prompts):
            errors.append(f"prompt must be a string or a non-empty list of strings, got {shown(req.prompt)}")
        errors += _text_problems(req)
        for name in ("prompt_2", "negative_prompt"):
            value = getattr(req, name)
            if value is None or isinstance(value, str):
                continue  # one string applies to every prompt
            if not isinstance(value, (list, tuple)) or len(value) != len(prompts) or \
                    not all(isinstance(v, str) for v in value):
                errors.append(f"{name} must be a string or a list of strings as long as prompt, got {shown(value)}")
        for name in ("height", "width"):
            v = getattr(req, name)
            if not _is_int(v) or v <= 0 or v % self.multiple_of or v > MAX_SIDE:
                errors.append(f"{name} must be a positive multiple of {self.multiple_of} (at most {MAX_SIDE}), "
                              f"got {shown(v)}")
        steps = req.num_inference_steps
        if not _is_int(steps) or not 1 <= steps <= self.max_steps:
            errors.append(f"num_inference_steps must be an integer in [1, {self.max_steps}], got {shown(steps)}")
        for name in CFG_SCALE_FIELDS:
            v = getattr(req, name)
            if v is not None and (not _is_number(v) or not 0 <= v <= MAX_SCALE):  # NaN fails the comparison
                errors.append(f"{name} must be a number in [0, {MAX_SCALE:g}], got {shown(v)}")
        msl, limit = req.max_sequence_length, self.max_sequence_length_limit
        if msl is not None and (not _is_int(msl) or msl <= 0 or (limit and msl > limit)):
            bound = f"in [1, {limit}]" if limit else ">= 1"
            errors.append(f"max_sequence_length must be an integer {bound}, got {shown(msl)}")
        if not _is_int(req.num_images_per_prompt) or not 1 <= req.num_images_per_prompt <= MAX_IMAGES:
            errors.append(f"num_images_per_prompt must be an integer in [1, {MAX_IMAGES}], "
                          f"got {shown(req.num_images_per_prompt)}")
        if req.output_type not in OUTPUT_TYPES:
            errors.append(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {shown(req.output_type)}")
        errors += _seed_problems(req.seed, len(prompts))
        errors += input_latents_problems(req.input_latents)
        return errors


def _seed_problems(seed, prompts: int) -> list[str]:
    """A seed is an integer; a list of them (one per prompt) draws each prompt's images from its own seed."""
    def ok(v):
        return _is_int(v) and SEED_MIN <= v <= SEED_MAX

    if seed is None or ok(seed):
        return []
    if not isinstance(seed, (list, tuple)):
        return [f"seed must be an integer in [-2**63, 2**64 - 1], got {shown(seed)}"]
    if not seed or not all(ok(v) for v in seed):
        return [f"seed must be an integer in [-2**63, 2**64 - 1] or a list of them (one per prompt), got {shown(seed)}"]
    return [] if len(seed) == prompts else \
        [f"seed is a list of {len(seed)} seeds; a list needs one seed per prompt ({prompts})"]


def first_seed(seed):
    """The seed of the request's generator: the seed, or the first of a list of seeds (one per prompt)."""
    return seed[0] if isinstance(seed, (list, tuple)) else seed


def _text_problems(req: Req) -> list[str]:
    """Prompts must be valid Unicode (a lone surrogate from a mis-decoded argument breaks tokenizers)
    and of a length tokenizers handle quickly."""
    errors = []
    for name in ("prompt", "prompt_2", "negative_prompt"):
        value = getattr(req, name)
        texts = [value] if isinstance(value, str) else value if isinstance(value, (list, tuple)) else []
        for text in (t for t in texts if isinstance(t, str)):
            if len(text) > MAX_PROMPT_CHARS:
                errors.append(f"{name} is {len(text)} characters long; at most {MAX_PROMPT_CHARS} are accepted")
                break
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                errors.append(f"{name} is not valid Unicode text ({e.reason} at character {e.start}): "
                              f"{shown(text)}")
                break
    return errors


def input_latents_problems(latents) -> list[str]:
    """Type, dtype and values of caller-supplied latents (their shape is the latent stage's to check)."""
    if latents is None:
        return []
    if not isinstance(latents, torch.Tensor):
        return [f"input_latents must be a torch.Tensor, got {type(latents).__name__} {shown(latents)}"]
    if not latents.is_floating_point():
        return [f"input_latents must be a floating-point tensor, got dtype {latents.dtype}"]
    if latents.device.type not in ("cpu", "cuda"):
        return [f"input_latents must be on cpu or cuda, got device {latents.device}"]
    if not bool(torch.isfinite(latents).all()):
        return ["input_latents contains NaN or infinite values"]
    return []
