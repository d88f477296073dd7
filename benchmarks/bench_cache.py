"""Step caches: speed-up and quality of diffstage's `cache=teacache|first_block`, beside cache-dit's DBCache.

    pip install cache-dit                     # the peer; used here only, never by diffstage
    python benchmarks/bench_cache.py          # writes benchmarks/results/bench_cache.json (about 25 minutes)

Two jobs, each in one process, every setting interleaved chunk by chunk so that drift in the machine's speed
hits them alike:

- `digits` (the embedded model; 20 steps, true CFG 6.0, 32x32), one image per call, 10 digits x --per-digit
  seeds from 20000 (seeds no training, tuning or gate uses). diffstage's settings against diffstage uncached;
  cache-dit's DBCache (Fn=1, Bn=0, its other defaults) on Diffusers' FluxPipeline against that pipeline
  uncached. For each: seconds per image, speed-up against its own uncached run and against Diffusers
  uncached, PSNR and SSIM against its own uncached images (mean and minimum), the digits classifier's
  accuracy and its change, and the share of transformer calls skipped.
- the bench FLUX.1 [dev] checkpoint (random weights, hidden 768; 256x256, 20 steps, guidance 3.5): the same
  without accuracy (random weights draw nothing to recognise).

Then, for each cache-dit setting, the fastest diffstage setting at least as close to its uncached images
(mean PSNR): the speed-ups side by side. Reuse of stage outputs is off, so only step caching differs.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "models" / "digits" / "checkpoint"
DIGITS_SETTINGS = {  # name -> diffstage overrides
    "teacache 0.1": ["cache=teacache", "cache.threshold=0.1"],
    "teacache 0.15": ["cache=teacache", "cache.threshold=0.15"],
    "teacache 0.2": ["cache=teacache", "cache.threshold=0.2"],
    "teacache 0.3": ["cache=teacache", "cache.threshold=0.3"],
    "teacache 0.3 extrapolate": ["cache=teacache", "cache.threshold=0.3", "cache.extrapolate=true"],
    "teacache 0.4": ["cache=teacache", "cache.threshold=0.4"],
    "first_block 0.1": ["cache=first_block", "cache.threshold=0.1"],
    "first_block 0.2": ["cache=first_block", "cache.threshold=0.2"],
    "first_block 0.3": ["cache=first_block", "cache.threshold=0.3"],
}
# Random weights change little from step to step by TeaCache's FLUX.1 polynomial, and much by the first
# block's residual: other thresholds.
FLUX_SETTINGS = {
    "teacache 0.2": ["cache=teacache", "cache.threshold=0.2"],
    "teacache 0.4": ["cache=teacache", "cache.threshold=0.4"],
    "teacache 0.8": ["cache=teacache", "cache.threshold=0.8"],
    "first_block 0.4": ["cache=first_block", "cache.threshold=0.4"],
    "first_block 0.8": ["cache=first_block", "cache.threshold=0.8"],
}
PEER_THRESHOLDS = (0.08, 0.16, 0.3)  # cache-dit DBCache residual_diff_threshold, as measured in issue 12


def diffstage_pipe(model: str, checkpoint: Path, overrides: list[str]):
    from diffstage import build_pipeline

    pipe = build_pipeline(model, model_path=checkpoint, overrides=["reuse.enabled=false", "runtime.matmul_dtype=null",
                                                                  "runtime.compile=false", *overrides])
    next(s for s in pipe.stages if type(s).__name__ == "DenoisingStage").progress = False
    return pipe


def diffusers_pipe(checkpoint: Path, threshold: float | None):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(checkpoint, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    if threshold is not None:
        import cache_dit
        from cache_dit import DBCacheConfig

        cache_dit.enable_cache(pipe, cache_config=DBCacheConfig(Fn_compute_blocks=1, Bn_compute_blocks=0,
                                                                residual_diff_threshold=threshold))
    return pipe


class Setting:
    """One way of generating: its pipeline, the images it made, the seconds it took, the calls it skipped."""

    def __init__(self, name: str, library: str, pipe, baseline: str):
        self.name, self.library, self.pipe, self.baseline = name, library, pipe, baseline
        self.images: list[np.ndarray] = []
        self.seconds = 0.0
        self.computed = self.cached = 0

    def generate(self, prompt: str, seed: int, sampling: dict) -> np.ndarray:
        if self.library == "diffusers":
            extra = {k: sampling[k] for k in ("negative_prompt", "true_cfg_scale") if k in sampling}
            return self.pipe(prompt, generator=torch.Generator("cpu").manual_seed(seed), output_type="np",
                             guidance_scale=sampling["guidance_scale"], height=sampling["height"],
                             width=sampling["width"], num_inference_steps=sampling["num_inference_steps"],
                             max_sequence_length=sampling["max_sequence_length"], **extra).images
        out = self.pipe(prompt, seed=seed, output_type="np", **sampling)
        stats = next(iter(out.reports.values()), {}).get("step_cache")
        if stats:
            self.computed += stats["computed"]
            self.cached += stats["cached"]
        return out.images

    def run(self, jobs: list[tuple[str, int]], sampling: dict, keep: bool = True) -> None:
        start = time.perf_counter()
        images = [self.generate(prompt, seed, sampling) for prompt, seed in jobs]
        if keep:
            self.seconds += time.perf_counter() - start
            self.images += images


def measure(settings: list[Setting], jobs: list[tuple[str, int]], sampling: dict, chunk: int) -> None:
    for s in settings:  # warm-up, not counted
        s.run(jobs[:1], sampling, keep=False)
    for begin in range(0, len(jobs), chunk):
        for s in settings:
            s.run(jobs[begin:begin + chunk], sampling)
        done = min(begin + chunk, len(jobs))
        print(f"{done}/{len(jobs)} images: " + ", ".join(f"{s.name} {s.seconds:.1f}s" for s in settings),
              file=sys.stderr, flush=True)


def summarise(settings: list[Setting], labels: np.ndarray | None) -> dict:
    from diffstage.quality import psnr, ssim

    by_name = {s.name: s for s in settings}
    diffusers_s = by_name["diffusers"].seconds
    out = {}
    for s in settings:
        base = by_name[s.baseline]
        images, reference = np.concatenate(s.images), np.concatenate(base.images)
        p, q = np.minimum(psnr(images, reference), 100.0), ssim(images, reference)  # identical: 100 dB
        row = {"library": s.library, "baseline": s.baseline,
               "s_per_image": round(s.seconds / len(s.images), 4),
               "speedup_vs_own_uncached": round(base.seconds / s.seconds, 3),
               "speedup_vs_diffusers_uncached": round(diffusers_s / s.seconds, 3),
               "psnr_mean_db": round(float(p.mean()), 2), "psnr_min_db": round(float(p.min()), 2),
               "ssim_mean": round(float(q.mean()), 4), "ssim_min": round(float(q.min()), 4)}
        if s.computed + s.cached:
            row["calls_skipped"] = round(s.cached / (s.computed + s.cached), 3)
        if labels is not None:
            from diffstage.models.digits.classifier import classify

            accuracy = float((classify(images) == labels).mean())
            row["accuracy"] = round(accuracy, 4)
            row["accuracy_change_points"] = round(100 * (accuracy - float((classify(reference) == labels).mean())), 1)
        out[s.name] = row
    return out


def side_by_side(rows: dict) -> list[dict]:
    """For each cache-dit setting: the fastest diffstage setting whose mean PSNR is at least as high."""
    pairs = []
    for name, peer in rows.items():
        if not name.startswith("cache-dit"):
            continue
        ours = [(n, r) for n, r in rows.items() if r["library"] == "diffstage" and r["baseline"] != n
                and r["psnr_mean_db"] >= peer["psnr_mean_db"]]
        best = max(ours, key=lambda nr: nr[1]["speedup_vs_own_uncached"], default=None)
        pairs.append({"cache-dit": name, "cache-dit_speedup": peer["speedup_vs_own_uncached"],
                      "cache-dit_psnr_mean_db": peer["psnr_mean_db"],
                      "diffstage": best[0] if best else None,
                      "diffstage_speedup": best[1]["speedup_vs_own_uncached"] if best else None,
                      "diffstage_psnr_mean_db": best[1]["psnr_mean_db"] if best else None,
                      "diffstage_faster": bool(best and best[1]["speedup_vs_own_uncached"]
                                               > peer["speedup_vs_own_uncached"])})
    return pairs


def job(name: str, model: str, checkpoint: Path, ours: dict, sampling: dict, jobs, labels, chunk: int,
        peer: bool) -> dict:
    settings = [Setting("diffstage", "diffstage", diffstage_pipe(model, checkpoint, []), "diffstage")]
    settings += [Setting(n, "diffstage", diffstage_pipe(model, checkpoint, o), "diffstage") for n, o in ours.items()]
    settings.append(Setting("diffusers", "diffusers", diffusers_pipe(checkpoint, None), "diffusers"))
    if peer:
        settings += [Setting(f"cache-dit DBCache F1B0 {t}", "diffusers", diffusers_pipe(checkpoint, t), "diffusers")
                     for t in PEER_THRESHOLDS]
    print(f"{name}: {len(jobs)} images x {len(settings)} settings", file=sys.stderr, flush=True)
    measure(settings, jobs, sampling, chunk)
    by_name = {s.name: s for s in settings}
    parity = float(np.abs(np.concatenate(by_name["diffstage"].images)
                          - np.concatenate(by_name["diffusers"].images)).max())
    rows = summarise(settings, labels)
    return {"sampling": sampling, "images": len(jobs), "uncached_max_abs_diff_diffstage_vs_diffusers": parity,
            "settings": rows, "side_by_side": side_by_side(rows) if peer else []}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-digit", type=int, default=50, help="digits: seeds per digit (500 images)")
    parser.add_argument("--flux-images", type=int, default=6, help="bench FLUX: images (0: skip the job)")
    parser.add_argument("--chunk", type=int, default=10, help="images per setting before the next takes its turn")
    parser.add_argument("--ckpt", type=Path, default=ROOT / ".cache" / "bench-flux")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_cache.json")
    args = parser.parse_args(argv)
    try:
        import cache_dit  # noqa: F401

        peer = True
    except ImportError:
        print("cache-dit is not installed (pip install cache-dit): measuring diffstage only", file=sys.stderr)
        peer = False

    from diffstage import check_model
    from diffstage.hardware import cpu_info
    from diffstage.models.digits import data

    results = {}
    machine = {**cpu_info(), "threads": torch.get_num_threads(), "torch": torch.__version__,
               "python": platform.python_version(), "device": "cpu",
               "cache_dit": __import__("cache_dit").__version__ if peer else None}

    def write() -> None:  # after each job, so a failure later keeps what was measured
        report = {"benchmark": "step caches: diffstage cache=teacache|first_block vs cache-dit DBCache (Fn=1, Bn=0) "
                               "on Diffusers' FluxPipeline; quality against each library's own uncached images",
                  "machine": machine, "results": results}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")

    sampling = {k: v for k, v in check_model("digits").spec.sampling.model_dump().items()
                if k in ("num_inference_steps", "guidance_scale", "true_cfg_scale", "negative_prompt", "height",
                         "width", "max_sequence_length")}
    jobs = [(data.prompt(d), 20000 + d * args.per_digit + k) for d in range(10) for k in range(args.per_digit)]
    labels = np.repeat(np.arange(10), args.per_digit)
    results["digits"] = job("digits", "digits", DIGITS, DIGITS_SETTINGS, sampling, jobs, labels, args.chunk, peer)
    write()
    if args.flux_images:
        from diffstage.models.flux.tiny import build_tiny_flux

        build_tiny_flux(args.ckpt, variant="dev", size="bench")
        flux_sampling = {"num_inference_steps": 20, "guidance_scale": 3.5, "height": 256, "width": 256,
                         "max_sequence_length": 32}
        flux_jobs = [("a photo of a red fox in the snow", 100 + k) for k in range(args.flux_images)]
        results["bench_flux"] = job("bench FLUX", "flux", args.ckpt, FLUX_SETTINGS, flux_sampling, flux_jobs, None, 1, peer)
    write()
    for name, result in results.items():
        print(f"\n{name} ({result['images']} images; uncached diffstage vs Diffusers max|Δ| "
              f"{result['uncached_max_abs_diff_diffstage_vs_diffusers']:.2g})")
        for setting, row in result["settings"].items():
            print(f"  {setting:28s} {row['speedup_vs_own_uncached']:5.2f}x own, {row['speedup_vs_diffusers_uncached']:5.2f}x "
                  f"Diffusers  PSNR {row['psnr_mean_db']:6.2f} (min {row['psnr_min_db']:6.2f})  SSIM "
                  f"{row['ssim_mean']:.4f}  acc {row.get('accuracy', '-')} ({row.get('accuracy_change_points', '-')})  "
                  f"skipped {row.get('calls_skipped', '-')}")
        for pair in result["side_by_side"]:
            print(f"  {pair}")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
