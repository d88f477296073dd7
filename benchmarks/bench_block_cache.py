"""Step caches on stock Diffusers transformers through their model YAML's declaration (`acceleration:`), beside
Diffusers' own cache hooks on the same jobs.

    python benchmarks/bench_block_cache.py    # writes benchmarks/results/bench_block_cache.json (about 10 minutes)

Two jobs, each in one process, on bench-size random-weight checkpoints (8 blocks, hidden 192; see
diffstage.models.wan.tiny.SIZES and diffstage.models.qwen_image.tiny.SIZES):

- `wan`: Wan2.1 text-to-video, 256x256, 17 frames, 20 steps, guidance 5.0 (CFG batched: one call a step);
- `qwen_image`: Qwen-Image text-to-image, 128x128, 20 steps, true CFG 4.0 (two calls a step).

Settings: diffstage uncached, `cache=first_block` and `cache=teacache` at several thresholds (the transformers
are Diffusers' own classes, their blocks wrapped and their probe hooked as wan_t2v.yaml / qwen_image.yaml
declare); Diffusers' pipeline uncached, with `transformer.enable_cache(FirstBlockCacheConfig(threshold=...))`
and with `TaylorSeerCacheConfig(use_lite_mode=True)` (its blocks skipped and the output predicted by a Taylor
step every `cache_interval` steps). Every setting runs its outputs in turn, chunk by chunk, so drift in the
machine's speed hits them alike. Each cached setting is compared with its own library's uncached outputs:
seconds per output, speed-up, PSNR and SSIM over the images / frames (mean and minimum), the share of
transformer calls skipped (diffstage's count)."""
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

from bench_cache import Setting, measure, summarise  # the same timing and quality code as bench_cache.py

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red fox running through fresh snow"
IDENTITY = "cache.coefficients=[1,0]"  # TeaCache without rescaling: random weights fit no published polynomial
JOBS = {
    "wan": {
        "model": "wan_t2v", "pipeline": "WanPipeline", "output": "frames",
        "sampling": {"height": 256, "width": 256, "num_frames": 17, "num_inference_steps": 20,
                     "guidance_scale": 5.0, "max_sequence_length": 32},
        "diffstage": {
            "first_block 0.1": ["cache=first_block", "cache.threshold=0.1"],
            "first_block 0.2": ["cache=first_block", "cache.threshold=0.2"],
            "teacache 1.5": ["cache=teacache", "cache.threshold=1.5", IDENTITY],
            "teacache 3": ["cache=teacache", "cache.threshold=3", IDENTITY],
            # wan_t2v.yaml's defaults: the TeaCache authors' Wan2.1-1.3B polynomial, threshold 0.08
            "teacache yaml-default": ["cache=teacache"],
        },
        "first_block_cache": (0.1, 0.2),
    },
    "qwen_image": {
        "model": "qwen_image", "pipeline": "QwenImagePipeline", "output": "images",
        "sampling": {"height": 128, "width": 128, "num_inference_steps": 20, "true_cfg_scale": 4.0,
                     "negative_prompt": "blurry", "max_sequence_length": 32},
        "diffstage": {
            "first_block 0.6": ["cache=first_block", "cache.threshold=0.6"],
            "first_block 0.8": ["cache=first_block", "cache.threshold=0.8"],
            "teacache 0.1": ["cache=teacache", "cache.threshold=0.1"],  # qwen_image.yaml: identity coefficients
            "teacache 0.2": ["cache=teacache", "cache.threshold=0.2"],  # and this threshold by default
        },
        "first_block_cache": (0.6, 0.8),
    },
}
TAYLORSEER_INTERVALS = (2, 3)


class OutputSetting(Setting):
    """A Setting whose Diffusers pipeline takes the job's sampling as it is; a video's frames count as images.
    Each output's wall and CPU seconds are kept too: on a CPU shared with other work, the median wall time and
    the process's CPU time are steadier than the total wall time."""

    output = "images"

    def __init__(self, *args):
        super().__init__(*args)
        self.walls: list[float] = []
        self.cpu = 0.0

    def run(self, jobs: list[tuple[str, int]], sampling: dict, keep: bool = True) -> None:
        for job in jobs:
            wall, cpu = time.perf_counter(), time.process_time()
            super().run([job], sampling, keep)
            if keep:
                self.walls.append(time.perf_counter() - wall)
                self.cpu += time.process_time() - cpu

    def generate(self, prompt: str, seed: int, sampling: dict) -> np.ndarray:
        if self.library == "diffusers":
            out = self.pipe(prompt, generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **sampling)
        else:
            out = self.pipe(prompt, seed=seed, output_type="np", **sampling)
            stats = next(iter(out.reports.values()), {}).get("step_cache")
            if stats:
                self.computed += stats["computed"]
                self.cached += stats["cached"]
        array = np.asarray(getattr(out, self.output))
        return array.reshape(-1, *array.shape[-3:])  # [frames or images, H, W, C]


def diffstage_pipe(model: str, checkpoint: Path, overrides: list[str]):
    from diffstage import build_pipeline

    pipe = build_pipeline(model, model_path=checkpoint, overrides=["reuse.enabled=false", *overrides])
    next(s for s in pipe.stages if type(s).__name__ == "DenoisingStage").progress = False
    return pipe


def diffusers_pipe(pipeline: str, checkpoint: Path, cache_config=None):
    import diffusers

    pipe = getattr(diffusers, pipeline).from_pretrained(checkpoint, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    if cache_config is not None:
        pipe.transformer.enable_cache(cache_config)
    return pipe


def settings_for(job: dict, checkpoint: Path) -> list[OutputSetting]:
    from diffusers import FirstBlockCacheConfig, TaylorSeerCacheConfig

    def setting(name, library, pipe, baseline):
        s = OutputSetting(name, library, pipe, baseline)
        s.output = job["output"]
        return s

    model, pipeline = job["model"], job["pipeline"]
    out = [setting("diffstage", "diffstage", diffstage_pipe(model, checkpoint, []), "diffstage")]
    out += [setting(f"diffstage {n}", "diffstage", diffstage_pipe(model, checkpoint, o), "diffstage")
            for n, o in job["diffstage"].items()]
    out.append(setting("diffusers", "diffusers", diffusers_pipe(pipeline, checkpoint), "diffusers"))
    out += [setting(f"diffusers FirstBlockCache {t}", "diffusers",
                    diffusers_pipe(pipeline, checkpoint, FirstBlockCacheConfig(threshold=t)), "diffusers")
            for t in job["first_block_cache"]]
    out += [setting(f"diffusers TaylorSeer lite interval {i}", "diffusers",
                    diffusers_pipe(pipeline, checkpoint, TaylorSeerCacheConfig(
                        cache_interval=i, disable_cache_before_step=2, use_lite_mode=True,
                        taylor_factors_dtype=torch.float32)), "diffusers")
            for i in TAYLORSEER_INTERVALS]
    return out


def run_job(name: str, job: dict, checkpoint: Path, outputs: int, chunk: int) -> dict:
    settings = settings_for(job, checkpoint)
    print(f"{name}: {outputs} outputs x {len(settings)} settings", file=sys.stderr, flush=True)
    measure(settings, [(PROMPT, seed) for seed in range(outputs)], job["sampling"], chunk)
    by_name = {s.name: s for s in settings}
    parity = float(np.abs(np.concatenate(by_name["diffstage"].images)
                          - np.concatenate(by_name["diffusers"].images)).max())
    rows = summarise(settings, None)
    unit = "video" if job["output"] == "frames" else "image"
    for s in settings:  # one generate call made one video or image
        row, base = rows[s.name], by_name[s.baseline]
        row[f"s_per_{unit}"] = row.pop("s_per_image")
        row[f"median_s_per_{unit}"] = round(statistics.median(s.walls), 4)
        row["median_speedup_vs_own_uncached"] = round(statistics.median(base.walls) / statistics.median(s.walls), 3)
        row[f"cpu_s_per_{unit}"] = round(s.cpu / len(s.walls), 4)
        row["cpu_speedup_vs_own_uncached"] = round(base.cpu / s.cpu, 3)
    return {"model": job["model"], "sampling": job["sampling"], "outputs": outputs,
            "uncached_max_abs_diff_diffstage_vs_diffusers": parity, "results": rows}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--outputs", type=int, default=2, help="videos / images per setting (seeds 0, 1, ...)")
    parser.add_argument("--chunk", type=int, default=1, help="outputs per setting before the next takes its turn")
    parser.add_argument("--jobs", nargs="+", default=list(JOBS), choices=list(JOBS))
    parser.add_argument("--size", default="bench", help="checkpoint size (tiny: a quick check of this script)")
    parser.add_argument("--steps", type=int, default=None, help="override the jobs' steps (a quick check)")
    parser.add_argument("--shared-cpu", action="store_true", help="record that other work shared the CPU")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_block_cache.json")
    args = parser.parse_args(argv)

    import diffusers

    from diffstage.hardware import cpu_info
    from diffstage.models.qwen_image.tiny import build_tiny_qwen_image
    from diffstage.models.wan.tiny import build_tiny_wan

    builders = {"wan": lambda d: build_tiny_wan(d, size=args.size),
                "qwen_image": lambda d: build_tiny_qwen_image(d, size=args.size)}
    report = {
        "benchmark": "step caches on Diffusers' stock Wan2.1 and Qwen-Image transformers through their model YAML "
                     "declarations (diffstage first_block, teacache) beside Diffusers' FirstBlockCacheConfig and "
                     "TaylorSeerCacheConfig, random weights ('bench' size)",
        "machine": {**cpu_info(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "diffusers": diffusers.__version__, "python": platform.python_version(), "device": "cpu",
                    "shared_cpu": args.shared_cpu},
        "jobs": {},
        "notes": "speed-ups and PSNR/SSIM are against the same library's uncached outputs (frames as images; "
                 "speedup_vs_own_uncached from total wall time, median_speedup_* from the median wall time of one "
                 "output, cpu_speedup_* from the process's CPU time, steadier when other work shares the CPU; "
                 "identical images count as 100 dB); calls_skipped is diffstage's share of transformer calls whose "
                 "blocks (teacache: all; first_block: all but the first) were not run. teacache on random weights: "
                 "the probe's change is used unrescaled (coefficients [1, 0]) except in 'teacache yaml-default'.",
    }
    for name in args.jobs:
        job = dict(JOBS[name])
        if args.steps:
            job["sampling"] = {**job["sampling"], "num_inference_steps": args.steps}
        checkpoint = builders[name](ROOT / ".cache" / f"{args.size}-{name.replace('_', '-')}")
        report["jobs"][name] = run_job(name, job, checkpoint, args.outputs, args.chunk)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")  # after each job: a later failure keeps it
        for setting, r in report["jobs"][name]["results"].items():
            unit = next(k for k in r if k.startswith("s_per_"))
            print(f"{name:10s} {setting:40s} {r[unit]:.3f} {unit}  x{r['speedup_vs_own_uncached']:.2f} "
                  f"(median x{r['median_speedup_vs_own_uncached']:.2f}, CPU x{r['cpu_speedup_vs_own_uncached']:.2f})  "
                  f"PSNR {r['psnr_mean_db']} dB (min {r['psnr_min_db']})  SSIM {r['ssim_mean']}  "
                  f"skipped {r.get('calls_skipped', '-')}")
    print(args.out)


if __name__ == "__main__":
    sys.exit(main())
