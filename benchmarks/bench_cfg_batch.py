"""Batched classifier-free guidance on the embedded `digits` model (true CFG 6.0), against Diffusers.

    python benchmarks/bench_cfg_batch.py       # writes benchmarks/results/bench_cfg_batch.json

With CFG, DenoisingStage runs the conditional and unconditional branches as one transformer
call (`cfg_batch`, the default) instead of two. This times, in one process and on the same
checkpoint, prompt and seeds: Diffusers' FluxPipeline (true CFG: two calls a step), diffstage
with `cfg_batch` off (two calls) and on (one call), for one image and for a batch of four.
Rounds run the variants in turn after a warm-up each; medians and ratios to Diffusers are
reported, with the largest difference of each image from Diffusers'."""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
CKPT = ROOT / "models" / "digits" / "checkpoint"
PROMPT = "a handwritten digit seven"
VARIANTS = ("diffusers", "diffstage_two_calls", "diffstage_cfg_batch")


def load(variant: str):
    if variant == "diffusers":
        from diffusers import FluxPipeline

        pipe = FluxPipeline.from_pretrained(CKPT, torch_dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        return pipe
    from diffstage import build_pipeline

    pipe = build_pipeline("digits")
    denoise = next(s for s in pipe.stages if type(s).__name__ == "DenoisingStage")
    denoise.cfg_batch = variant == "diffstage_cfg_batch"
    denoise.progress = False
    return pipe


def generate(variant: str, pipe, images: int, seed: int, sampling: dict) -> np.ndarray:
    if variant == "diffusers":
        return pipe(PROMPT, negative_prompt=sampling["negative_prompt"], true_cfg_scale=sampling["true_cfg_scale"],
                    guidance_scale=sampling["guidance_scale"], height=sampling["height"], width=sampling["width"],
                    num_inference_steps=sampling["num_inference_steps"],
                    max_sequence_length=sampling["max_sequence_length"], num_images_per_prompt=images,
                    generator=torch.Generator("cpu").manual_seed(seed), output_type="np").images
    return pipe(PROMPT, seed=seed, num_images_per_prompt=images, output_type="np").images


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=7, help="timed rounds after the warm-up")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_cfg_batch.json")
    args = parser.parse_args(argv)

    from diffstage import check_model
    from diffstage.hardware import cpu_info

    sampling = check_model("digits").spec.sampling.model_dump()
    pipes = {name: load(name) for name in VARIANTS}
    results = {}
    for images in (1, 4):
        outputs, times = {}, {name: [] for name in VARIANTS}
        for name in VARIANTS:  # warm-up; its image is the one compared
            outputs[name] = generate(name, pipes[name], images, args.seed, sampling)
        for rep in range(args.reps):
            for name in VARIANTS:
                start = time.perf_counter()
                generate(name, pipes[name], images, args.seed, sampling)
                times[name].append(time.perf_counter() - start)
            print(f"{images} image(s), round {rep + 1}/{args.reps}: "
                  + ", ".join(f"{n} {times[n][-1]:.3f} s" for n in VARIANTS), file=sys.stderr)
        base = statistics.median(times["diffusers"])
        results[f"{images}_image{'s' if images > 1 else ''}"] = {
            name: {"wall_s_median": round(statistics.median(times[name]), 4),
                   "wall_s_all": [round(t, 4) for t in times[name]],
                   "speedup_vs_diffusers": round(base / statistics.median(times[name]), 3),
                   "max_abs_diff_vs_diffusers": float(np.abs(outputs[name] - outputs["diffusers"]).max())}
            for name in VARIANTS}
    report = {
        "benchmark": "digits (FLUX.1 architecture, 32x32), true CFG: batched branches vs two calls vs Diffusers",
        "settings": {**{k: sampling[k] for k in ("num_inference_steps", "true_cfg_scale", "height", "width")},
                     "reps": args.reps, "seed": args.seed, "prompt": PROMPT},
        "machine": {**cpu_info(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "python": platform.python_version(), "device": "cpu"},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["results"], indent=2))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
