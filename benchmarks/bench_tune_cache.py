"""The README's Optuna example, run and checked: the step cache setting it finds on `digits`, timed against the
uncached pipeline and Diffusers' FluxPipeline on the same checkpoint.

    python benchmarks/bench_tune_cache.py                 # writes benchmarks/results/bench_tune_cache.json
    python benchmarks/bench_tune_cache.py --trials 10     # a shorter search

1. The search, as the README gives it: `diffstage generate -m hydra/sweeper=tune_cache cache=teacache
   objective.metric=seconds objective.psnr_min=30` (30 trials of cache.threshold in [0.05, 0.6] x steps in
   {10, 15, 20}; each trial's seconds per image is one image, so the search's own timings are noisy;
   --images-per-trial N adds sampling.num_images_per_prompt=N, and the worst of a trial's N images counts).
2. The setting it found, timed fairly: in one process, --images images (seeds 0..N-1, after a warm-up each) with
   Diffusers' FluxPipeline (20 steps, the model's default), diffstage uncached (20 steps) and diffstage with the
   found setting; medians of seconds per image, and the found setting's PSNR against the uncached image of each
   seed (worst and mean).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cfg_batch import CKPT  # noqa: E402

from diffstage.hardware import cpu_info  # noqa: E402
from diffstage.quality import psnr  # noqa: E402

PROMPT = "a handwritten digit seven"  # conf/config.yaml's default prompt, the search's
EXE = Path(sys.executable).with_name("diffstage")


def search(trials: int, psnr_min: float, per_trial: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        command = [str(EXE), "generate", "-m", "hydra/sweeper=tune_cache", "cache=teacache", "objective.metric=seconds",
                   f"objective.psnr_min={psnr_min:g}", f"hydra.sweeper.n_trials={trials}",
                   *([f"sampling.num_images_per_prompt={per_trial}"] if per_trial > 1 else []),
                   f"hydra.sweep.dir={tmp}"]
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"the search failed ({done.returncode}):\n{done.stderr[-3000:]}")
        found = yaml.safe_load((Path(tmp) / "optimization_results.yaml").read_text())
        rows = [json.loads(line) for line in (Path(tmp) / "sweep.jsonl").read_text().splitlines()]
    return {"command": " ".join(command[1:-1]), "wall_s": round(wall, 1), "trials": len(rows),
            "best_params": found["best_params"], "best_value_s": round(found["best_value"], 4),
            "trials_within_bound": sum(r["score"]["objective"] is not None for r in rows),
            "scores": [{**r["overrides"], **r["score"]} for r in rows]}


def timed(call, seeds) -> tuple[float, list[np.ndarray]]:
    call(seeds[0])  # warm-up
    seconds, images = [], []
    for seed in seeds:
        start = time.perf_counter()
        images.append(call(seed))
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), images


def compare(best: dict, images: int) -> dict:
    from diffusers import FluxPipeline

    from diffstage import build_pipeline

    seeds = list(range(images))
    reference = FluxPipeline.from_pretrained(CKPT, torch_dtype=torch.float32)
    reference.set_progress_bar_config(disable=True)

    def diffusers(seed):
        return reference(PROMPT, negative_prompt="", true_cfg_scale=6.0, guidance_scale=0.0, height=32, width=32,
                         num_inference_steps=20, max_sequence_length=16, output_type="np",
                         generator=torch.Generator("cpu").manual_seed(seed)).images

    uncached = build_pipeline("digits", overrides=["reuse.enabled=false"])
    tuned = build_pipeline("digits", overrides=["reuse.enabled=false", "cache=teacache",
                                                f"cache.threshold={best['cache.threshold']}",
                                                f"sampling.num_inference_steps={best['sampling.num_inference_steps']}"])
    runs = {"diffusers_20_steps": timed(diffusers, seeds),
            "diffstage_uncached_20_steps": timed(lambda s: uncached(PROMPT, seed=s, output_type="np").images, seeds),
            "diffstage_tuned": timed(lambda s: tuned(PROMPT, seed=s, output_type="np").images, seeds)}
    quality = [float(psnr(t, u)[0]) for t, u in zip(runs["diffstage_tuned"][1], runs["diffstage_uncached_20_steps"][1])]
    out = {name: {"s_per_image": round(s, 4)} for name, (s, _) in runs.items()}
    base = out["diffusers_20_steps"]["s_per_image"]
    for row in out.values():
        row["speedup_vs_diffusers"] = round(base / row["s_per_image"], 2)
    out["diffstage_tuned"]["speedup_vs_uncached"] = round(
        out["diffstage_uncached_20_steps"]["s_per_image"] / out["diffstage_tuned"]["s_per_image"], 2)
    out["diffstage_tuned"]["psnr_vs_uncached_db"] = {"worst": round(min(quality), 2),
                                                     "mean": round(statistics.mean(quality), 2)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=30)
    p.add_argument("--psnr-min", type=float, default=30.0)
    p.add_argument("--images", type=int, default=10)
    p.add_argument("--images-per-trial", type=int, default=1,
                   help="sampling.num_images_per_prompt of each trial (the worst image's PSNR counts)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "bench_tune_cache.json")
    args = p.parse_args()
    found = search(args.trials, args.psnr_min, args.images_per_trial)
    report = {
        "benchmark": "digits: Optuna (conf/hydra/sweeper/tune_cache.yaml) tunes cache.threshold and steps for the "
                     f"fastest setting within {args.psnr_min:g} dB of uncached",
        "machine": {**cpu_info(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "python": platform.python_version(), "device": "cpu"},
        "search": found,
        "found_setting_timed": compare(found["best_params"], args.images),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report["search"].items() if k != "scores"}, indent=2))
    print(json.dumps(report["found_setting_timed"], indent=2))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
