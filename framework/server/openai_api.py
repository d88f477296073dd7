"""OpenAI's request bodies read into diffstage's request fields, with the same checks (and messages) as the CLI.

JSON bodies (/v1/images/generations) carry typed values; multipart forms (/v1/images/edits, /v1/videos) carry
strings, read here by the type each field has. Our extensions (seed, num_inference_steps, ..., and the request
fields a model YAML declares) come at the top level of the body: the `openai` client's `extra_body`."""
from __future__ import annotations

import json
import math
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

from ..errors import RequestError, did_you_mean, shown
from .media import IMAGE_FORMATS
from .pool import ServedModel

# extension -> type (the Req fields a request may set beyond prompt, n and size)
EXTENSIONS = {"seed": "int", "num_inference_steps": "int", "guidance_scale": "float", "true_cfg_scale": "float",
              "negative_prompt": "str", "max_sequence_length": "int", "cache": "str"}
# OpenAI fields that mean nothing for these models: accepted (the client may send them) and not used
IGNORED = {"quality", "style", "moderation", "background", "user", "safety_identifier", "input_fidelity"}
NOT_REQUEST = {"prompt", "seed", "input_latents", "output_type", "num_images_per_prompt", "height", "width",
               "image"}  # request fields set from OpenAI's own fields, or not over HTTP
MAX_N = 16
SIZE = re.compile(r"^([1-9][0-9]{0,5})x([1-9][0-9]{0,5})$")


@dataclass
class ImageRequest:
    """One parsed Images API request: the pipeline's fields and how to answer."""
    model: ServedModel
    prompt: str
    seed: int
    fields: dict[str, Any]  # Req fields beyond prompt and seed
    cache: str
    response_format: str = "b64_json"
    output_format: str = "png"
    compression: int | None = None
    stream: bool = False
    partial_images: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # OpenAI-specific values (seconds, size) echoed back


def _typed(name: str, value: Any, kind: str, form: bool) -> Any:
    """A form's string as the field's type (JSON values are checked by the request check itself)."""
    if not form or not isinstance(value, str) or kind in ("str", "text", "any", "image"):
        return value
    try:
        parsed = json.loads(value)
    except ValueError:
        raise RequestError(f"{name} must be {'true or false' if kind == 'bool' else 'a number'}, "
                           f"got {shown(value)}") from None
    return parsed


def model_extensions(model: ServedModel) -> dict[str, str]:
    """Every field a request to `model` may set beyond OpenAI's: ours, then its YAML's request fields."""
    # an image field takes uploads (edits' `image`), never a string: that would be a path on the server
    declared = {spec.name: spec.type for spec in model.checked.req_cls.extra_fields()
                if spec.role == "request" and spec.name not in NOT_REQUEST and spec.type not in ("image", "any")}
    return {**EXTENSIONS, **declared}


def parse_size(size: Any) -> dict[str, int]:
    if size is None or size == "auto":
        return {}
    match = SIZE.match(size) if isinstance(size, str) else None
    if match is None:
        raise RequestError(f"size must be WIDTHxHEIGHT such as 1024x1024 (or auto), got {shown(size)}")
    return {"width": int(match.group(1)), "height": int(match.group(2))}


def _choice(body: dict, name: str, options, default: Any) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if value not in options:
        raise RequestError(f"{name} must be one of {', '.join(map(str, options))}, got {shown(value)}")
    return value


def _int_in(body: dict, name: str, low: int, high: int, default: int | None, form: bool) -> int | None:
    value = _typed(name, body.get(name), "int", form)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise RequestError(f"{name} must be an integer in [{low}, {high}], got {shown(value)}")
    return value


def parse_image_request(body: dict[str, Any], model: ServedModel, known: set[str], form: bool = False,
                        inputs: dict[str, Any] | None = None) -> ImageRequest:
    """An Images API body (`known`: the OpenAI fields of this endpoint; `inputs`: uploaded images by request
    field) as an ImageRequest, checked like the CLI checks a request (RequestError: HTTP 400, the CLI's message)."""
    extensions = model_extensions(model)
    unknown = [k for k in body if k not in known and k not in extensions and k not in IGNORED]
    if unknown:
        options = sorted(known | set(extensions))
        hint = did_you_mean(unknown[0], options)
        raise RequestError(f"unknown field {shown(unknown[0])}" + (f" ({hint})" if hint else "")
                           + f"; accepted: {', '.join(options)}")
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise RequestError(f"prompt must be a non-empty string, got {shown(prompt)}")
    values = {name: _typed(name, body[name], kind, form) for name, kind in extensions.items()
              if body.get(name) is not None}
    seed = values.pop("seed", None)
    cache = values.pop("cache", None)
    fields = {**values, **parse_size(body.get("size")),
              "num_images_per_prompt": _int_in(body, "n", 1, MAX_N, 1, form), **(inputs or {})}
    if seed is None:
        seed = secrets.randbits(63)  # chosen here, so a batch can give this request its own
    kind = model.cache_kind(cache)
    model.plan(kind).request(prompt=prompt, seed=seed, **fields)  # the CLI's checks, before it waits in a queue
    stream = _typed("stream", body.get("stream"), "bool", form)
    if stream is not None and not isinstance(stream, bool):
        raise RequestError(f"stream must be true or false, got {shown(stream)}")
    return ImageRequest(
        model, prompt, seed, fields, kind,
        response_format=_choice(body, "response_format", ("b64_json", "url"), "b64_json"),
        output_format=_choice(body, "output_format", tuple(IMAGE_FORMATS), "png"),
        compression=_int_in(body, "output_compression", 0, 100, None, form), stream=bool(stream),
        partial_images=_int_in(body, "partial_images", 0, 3, 0, form) or 0)


def frames_for(seconds: Any, fps: int) -> int:
    """OpenAI's `seconds` of video as a frame count (4k + 1 frames, as video models take them)."""
    try:
        value = float(seconds)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value) or not 0 < value <= 60:
        raise RequestError(f"seconds must be a number of seconds in (0, 60], got {shown(seconds)}")
    return 4 * max(1, round(value * fps / 4)) + 1
