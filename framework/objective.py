"""The number a sweep job returns to a sweeper that optimizes (Hydra's Optuna sweeper minimizes it).

`objective.metric=seconds`: the job's seconds per image. With `objective.psnr_min`, the job also makes the
reference image (the same request with no step cache, at `objective.reference_steps` steps: the model's default
when null) and a job whose image is further from it than psnr_min dB scores +inf, so the sweeper looks for the
fastest setting that keeps the quality. The reference runs once per process: its stages' outputs are reused
by the jobs after the first (reuse.enabled), and its modules are the job's own. This module checks the settings
and turns a score into the sweeper's number; diffstage/job_score.py scores a job.
"""
from __future__ import annotations

import math
from typing import Any

from .errors import shown

METRICS = ("seconds",)


def objective_problems(section: Any) -> list[str]:
    """What is wrong with the run config's `objective` section (conf/config.yaml)."""
    if not isinstance(section, dict):
        return []  # a non-mapping is reported with the other sections
    problems = []
    metric, psnr_min, steps = section.get("metric"), section.get("psnr_min"), section.get("reference_steps")
    if metric is not None and metric not in METRICS:
        problems.append(f"objective.metric must be one of {', '.join(METRICS)} (or null), got {shown(metric)}")
    if psnr_min is not None and (isinstance(psnr_min, bool) or not isinstance(psnr_min, (int, float))
                                 or not math.isfinite(psnr_min)):
        problems.append(f"objective.psnr_min must be a finite number of dB (or null), got {shown(psnr_min)}")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        problems.append(f"objective.reference_steps must be a positive integer (or null), got {shown(steps)}")
    for key in ("psnr_min", "reference_steps"):
        if section.get(key) is not None and metric is None:
            problems.append(f"objective.{key} is set but objective.metric is not: set objective.metric=seconds")
    return problems


def wants_score(plain: dict[str, Any]) -> bool:
    return (plain.get("objective") or {}).get("metric") is not None


def objective_value(score: dict[str, Any] | None) -> float:
    """What the sweeper gets for a job: its objective, or +inf for a job that failed or missed psnr_min."""
    value = (score or {}).get("objective")
    return math.inf if value is None else float(value)
