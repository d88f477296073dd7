"""Finding where a pipeline departs from a reference pipeline (a parity gap): what each stage wrote and the
latents after each denoising step, side by side with the reference's, the first difference marked.

    from diffstage.parity import compare, reference_steps, trace
    ours = trace(pipe, "a red fox", seed=0, num_inference_steps=4)          # {"1:TextEncodingStage.prompt_embeds": ...,
    image, theirs = reference_steps(ref, "a red fox", generator=..., num_inference_steps=4)  # "step 1.latents": ...}
    theirs["1:TextEncodingStage.prompt_embeds"] = ref.encode_prompt(...)[0]   # anything else to line up
    compare(ours, theirs)                                                   # max |Δ| per key both have"""
from __future__ import annotations

from typing import Any

import torch

from .run_events import observing


def _copy(value: Any) -> Any:
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


def trace(pipe, prompt: str | list[str] | None = None, **fields: Any) -> dict[str, Any]:
    """Run `pipe` once (its checks first, no reuse of earlier outputs) and return what each stage wrote,
    as {"<index>:<StageClass>.<field>": value}, and the latents after each denoising step, as
    {"step <n>.latents": latents} (n from 1, in the transformer's layout, as Diffusers' step callback sees them)."""
    out: dict[str, Any] = {}

    def keep_step(event) -> None:
        if event.latents is not None:
            out[f"step {event.step}.latents"] = _copy(event.latents)

    req = pipe.make_request(prompt=prompt, **fields)
    pipe.check_request(req)
    with observing(keep_step), torch.inference_mode():
        for label, stage in zip(pipe.stage_labels(), pipe.stages):
            req = stage(req)
            contract = stage.declared
            written = (contract.writes | contract.optional_writes) if contract is not None else set(stage.writes)
            out.update({f"{label}.{name}": _copy(getattr(req, name)) for name in sorted(written)
                        if getattr(req, name, None) is not None})
    return out


def reference_steps(reference, *args: Any, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
    """Call a Diffusers pipeline with a step callback that keeps its latents after each step: (its output,
    {"step <n>.latents": latents}), keys as `trace` names ours."""
    steps: dict[str, Any] = {}

    def keep(pipeline, index, t, tensors):
        steps[f"step {index + 1}.latents"] = _copy(tensors["latents"])
        return tensors

    output = reference(*args, callback_on_step_end=keep, callback_on_step_end_tensor_inputs=["latents"], **kwargs)
    return output, steps


def compare(ours: dict[str, Any], theirs: dict[str, Any], tol: float = 1e-4, show: bool = True) -> list[tuple]:
    """(key, max |Δ| or a shape mismatch) for each tensor key both have, in `ours`' order; with `show`, one line
    each, the first over `tol` marked: the stage or step where the gap opens."""
    rows, marked = [], False
    for key, a in ours.items():
        b = theirs.get(key)
        if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
            continue
        if a.shape != b.shape:
            rows.append((key, f"shape {list(a.shape)} vs {list(b.shape)}"))
        else:
            rows.append((key, float((a.detach().float() - b.detach().to(a.device).float()).abs().max())))
    if show:
        for key, diff in rows:
            over = not isinstance(diff, float) or diff > tol
            mark = "  <- first gap" if over and not marked else ""
            marked = marked or over
            print(f"{key:60s} {diff if isinstance(diff, str) else f'{diff:.3g}'}{mark}")
    return rows
