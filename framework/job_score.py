"""A sweep job's score (diffstage/objective.py): its seconds per image and, with objective.psnr_min, its PSNR
against the reference image, which this module makes."""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from .build_plan import plan_build
from .quality import psnr
from .session import default_session


def _pixels(images) -> np.ndarray:
    """The images (a video's frames, one by one) as one [N, H, W, 3] array in [0, 1]."""
    frames = [frame for item in images for frame in (item if isinstance(item, list) else [item])]
    return np.stack([np.asarray(frame.convert("RGB"), dtype=np.float64) / 255.0 for frame in frames])


def score(run, out, reference: list | None) -> dict[str, Any]:
    """The job's score: seconds per image, PSNR (dB, the worst image) against `reference` (the reference images,
    made when psnr_min is set), and the objective (null when the image misses psnr_min: the sweeper sees +inf)."""
    section = run.plain.get("objective") or {}
    seconds = sum(out.timings.values()) / max(1, len(out.images))
    result: dict[str, Any] = {"seconds_per_image": seconds, "psnr": None, "objective": seconds}
    if section.get("psnr_min") is None or reference is None:
        return result
    worst = float(np.min(psnr(_pixels(out.images), _pixels(reference))))
    result["psnr"] = None if math.isinf(worst) else round(worst, 3)  # null: the reference image itself
    if worst < section["psnr_min"]:
        result["objective"] = None
    return result


def reference_images(run, checked, fields: dict[str, Any]) -> list | None:
    """The job's request made with no step cache, at the reference steps (the modules are the job's, shared
    through the session); None without objective.psnr_min. Made before the job's own run, which it warms up:
    the first job of a process is timed as the others are."""
    if (run.plain.get("objective") or {}).get("psnr_min") is None:
        return None
    sampling = dict(run.sampling)
    sampling["num_inference_steps"] = (run.plain.get("objective") or {}).get("reference_steps")
    reference = dataclasses.replace(run, cache={"kind": "none"}, sampling=sampling)
    plan = plan_build(reference, checked)
    return plan.load(default_session()).run(plan.request(**fields)).images
