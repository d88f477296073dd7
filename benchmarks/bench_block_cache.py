"""Step caches on a stock Diffusers transformer through its model YAML's block declaration (`acceleration:`),
beside Diffusers' own first-block cache hook on the same job.

    python benchmarks/bench_block_cache.py    # writes benchmarks/results/bench_block_cache.json (about 7 minutes)

The job: a bench-size random-weight Wan2.1 text-to-video checkpoint (8 blocks, hidden 192; see
diffstage.models.wan.tiny.SIZES), 256x256, 17 frames, 20 steps, guidance 5.0, in one process. Settings:
diffstage uncached and `cache=first_block` at several thresholds (the Wan transformer is Diffusers' own class,
its blocks wrapped as wan_t2v.yaml declares); Diffusers' WanPipeline uncached and with
`transformer.enable_cache(FirstBlockCacheConfig(threshold=...))`. Every setting runs its videos in turn,
chunk by chunk, so drift in the machine's speed hits them alike. Each cached setting is compared with its own
library's uncached videos: seconds per video, speed-up, PSNR and SSIM over the frames (mean and minimum), the
share of transformer calls skipped (diffstage's count)."""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np
import torch

from bench_cache import Setting, measure, summarise  # the same timing and quality code as bench_cache.py

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red fox running through fresh snow"
SAMPLING = {"height": 256, "width": 256, "num_frames": 17, "num_inference_steps": 20, "guidance_scale": 5.0,
            "max_sequence_length": 32}
THRESHOLDS = (0.05, 0.1, 0.2, 0.3)


class VideoSetting(Setting):
    """A Setting whose outputs are videos: their frames count as the images (for PSNR/SSIM)."""

    def generate(self, prompt: str, seed: int, sampling: dict) -> np.ndarray:
        if self.library == "diffusers":
            frames = self.pipe(prompt, generator=torch.Generator("cpu").manual_seed(seed), output_type="np",
                               **sampling).frames
        else:
            frames = super().generate(prompt, seed, sampling)
        return np.asarray(frames).reshape(-1, *np.asarray(frames).shape[-3:])  # [videos x frames, H, W, C]


def diffstage_pipe(checkpoint: Path, overrides: list[str]):
    from diffstage import build_pipeline

    pipe = build_pipeline("wan_t2v", model_path=checkpoint, overrides=["reuse.enabled=false", *overrides])
    next(s for s in pipe.stages if type(s).__name__ == "DenoisingStage").progress = False
    return pipe


def diffusers_pipe(checkpoint: Path, threshold: float | None):
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(checkpoint, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    if threshold is not None:
        from diffusers import FirstBlockCacheConfig

        pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))
    return pipe


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=4, help="videos per setting (seeds 0, 1, ...)")
    parser.add_argument("--chunk", type=int, default=1, help="videos per setting before the next takes its turn")
    parser.add_argument("--ckpt", type=Path, default=ROOT / ".cache" / "bench-wan")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_block_cache.json")
    args = parser.parse_args(argv)

    import diffusers

    from diffstage.hardware import cpu_info
    from diffstage.models.wan.tiny import build_tiny_wan

    build_tiny_wan(args.ckpt, size="bench")
    settings = [VideoSetting("diffstage", "diffstage", diffstage_pipe(args.ckpt, []), "diffstage")]
    settings += [VideoSetting(f"diffstage first_block {t}", "diffstage",
                              diffstage_pipe(args.ckpt, ["cache=first_block", f"cache.threshold={t}"]), "diffstage")
                 for t in THRESHOLDS]
    settings.append(VideoSetting("diffusers", "diffusers", diffusers_pipe(args.ckpt, None), "diffusers"))
    settings += [VideoSetting(f"diffusers FirstBlockCache {t}", "diffusers", diffusers_pipe(args.ckpt, t), "diffusers")
                 for t in THRESHOLDS]
    jobs = [(PROMPT, seed) for seed in range(args.videos)]
    measure(settings, jobs, SAMPLING, args.chunk)
    by_name = {s.name: s for s in settings}
    parity = float(np.abs(np.concatenate(by_name["diffstage"].images)
                          - np.concatenate(by_name["diffusers"].images)).max())
    rows = summarise(settings, None)
    for row in rows.values():  # a video's frames were counted as images
        row["s_per_video"] = row.pop("s_per_image")
    report = {
        "benchmark": "Wan2.1 text-to-video architecture, random weights ('bench' size), first-block step cache",
        "settings": {**SAMPLING, "videos": args.videos, "prompt": PROMPT, "thresholds": list(THRESHOLDS)},
        "machine": {**cpu_info(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "diffusers": diffusers.__version__, "python": platform.python_version(), "device": "cpu"},
        "uncached_max_abs_diff_diffstage_vs_diffusers": parity,
        "results": rows,
        "notes": "speed-ups and PSNR/SSIM are against the same library's uncached videos (frames as images; "
                 "identical frames count as 100 dB); calls_skipped is diffstage's count of transformer calls "
                 "whose blocks after the first were not run.",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for name, r in rows.items():
        print(f"{name:32s} {r['s_per_video']:.3f} s/video  x{r['speedup_vs_own_uncached']:.2f}  "
              f"PSNR {r['psnr_mean_db']} dB (min {r['psnr_min_db']})  SSIM {r['ssim_mean']}  "
              f"skipped {r.get('calls_skipped', '-')}")
    print(args.out)


if __name__ == "__main__":
    sys.exit(main())
