"""FLUX end to end: diffstage vs Diffusers' FluxPipeline on one locally built checkpoint.

    python benchmarks/bench_flux.py            # writes benchmarks/results/bench_flux.json

Builds the "bench" random-weight FLUX.1 [dev] checkpoint (hidden 768, 2 double + 4 single
blocks; see diffstage.models.flux.tiny.SIZES), then, in this one process, times Diffusers and
each diffstage variant on the same prompt, seed, size and steps: a warm-up call each, then
`--reps` rounds that run the variants in turn (interleaved, so drift hits all alike). Reports
medians, ratios to Diffusers, the PSNR of every output against Diffusers' image, and the
denoising step split into transformer time and everything else. Peak memory is the peak
RSS of a fresh process that loads the pipeline and makes one image, one process per variant."""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # machine_limit.py beside it
PROMPT = "a photo of a red fox in the snow"
# name -> (library, dtype, diffstage overrides)
F32 = ["runtime.matmul_dtype=null", "runtime.compile=false"]  # float32 throughout, whatever `auto` would pick
VARIANTS = {
    "diffusers": ("diffusers", torch.float32, None),            # the baseline
    "diffusers_bf16": ("diffusers", torch.bfloat16, None),      # Diffusers' own low-precision option
    "diffstage": ("diffstage", torch.float32, F32),             # native transformer, sdpa, reference kernels
    "diffstage_default": ("diffstage", torch.float32, []),      # runtime auto: what a plain run gets here
    "diffstage_compiled_kernels": ("diffstage", torch.float32, [*F32, "runtime.kernels=compiled"]),
    "diffstage_compile": ("diffstage", torch.float32, ["runtime.matmul_dtype=null", "runtime.compile=true"]),
    "diffstage_teacache": ("diffstage", torch.float32, [*F32, "cache=teacache"]),  # flux.yaml's threshold
    "diffstage_bf16_matmul": ("diffstage", torch.float32, ["runtime.matmul_dtype=bfloat16", "runtime.compile=false"]),
    "diffstage_bf16_matmul_compile": ("diffstage", torch.float32,
                                      ["runtime.matmul_dtype=bfloat16", "runtime.compile=true"]),
}


class TransformerClock:
    """Adds up the wall time spent inside a module's forward."""

    def __init__(self, module: torch.nn.Module):
        self.total, self.calls, self.first_start = 0.0, 0, None
        self.module, self.inputs = module, None  # the first call's (args, kwargs), to count and profile one call
        module.register_forward_pre_hook(self._start, with_kwargs=True)
        module.register_forward_hook(self._stop)

    def reset(self):
        self.total, self.calls, self.first_start = 0.0, 0, None

    def _start(self, module, args, kwargs):
        if self.inputs is None and kwargs.get("step_cache") is None:
            self.inputs = (args, dict(kwargs))
        self._t = time.perf_counter()
        self.first_start = self.first_start or self._t

    def _stop(self, *_):
        self.total += time.perf_counter() - self._t
        self.calls += 1


def load(variant: str, ckpt: Path):
    library, dtype, overrides = VARIANTS[variant]
    if library == "diffusers":
        from diffusers import FluxPipeline

        pipe = FluxPipeline.from_pretrained(ckpt, torch_dtype=dtype)
        pipe.set_progress_bar_config(disable=True)
        return pipe, pipe.transformer
    from diffstage import build_pipeline

    pipe = build_pipeline("flux", model_path=ckpt, overrides=[f"runtime.dtype={str(dtype)[6:]}", *overrides])
    return pipe, pipe.modules["transformer"]


def generate(variant: str, pipe, args) -> tuple[np.ndarray, float]:
    """One image; returns it and the denoising loop's wall time."""
    common = dict(height=args.size, width=args.size, num_inference_steps=args.steps, guidance_scale=3.5,
                  max_sequence_length=args.text_len, output_type="np")
    if VARIANTS[variant][0] == "diffusers":
        ends = []
        image = pipe(PROMPT, generator=torch.Generator("cpu").manual_seed(args.seed),
                     callback_on_step_end=lambda *a: (ends.append(time.perf_counter()), {})[1], **common).images
        return image, ends[-1]  # the caller subtracts the first transformer call's start
    out = pipe(PROMPT, seed=args.seed, **common)
    return out.images, out.timings["4:DenoisingStage"]


def psnr(a: np.ndarray, b: np.ndarray) -> float | None:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return None if mse == 0 else 10 * math.log10(1.0 / mse)  # None: identical images


def peak_memory_mb(variant: str, args) -> float:
    """Peak RSS (MB) of a fresh process that loads `variant` and makes one image."""
    cmd = [sys.executable, __file__, "--memory-of", variant, "--ckpt", str(args.ckpt), "--size", str(args.size),
           "--steps", str(args.steps), "--text-len", str(args.text_len)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def measure_memory(args) -> None:
    pipe, _ = load(args.memory_of, args.ckpt)
    generate(args.memory_of, pipe, args)
    # VmHWM: this process's own peak (ru_maxrss would carry the parent's peak over fork + exec)
    status = Path("/proc/self/status").read_text()
    print(int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) / 1024)


def linear_dtype(pipe) -> str:
    from diffstage.native import Linear

    module = pipe.transformer if hasattr(pipe, "transformer") else pipe.modules["transformer"]
    return ",".join(sorted({str(m.weight.dtype)[6:] for m in module.modules()
                            if isinstance(m, (Linear, torch.nn.Linear))}))


# variants profiled for where a transformer call's time goes (compiled ones fuse ops the profile would split)
PROFILED = ("diffusers", "diffstage", "diffstage_default")


def machine_report(clocks: dict, results: dict, args) -> dict:
    """The transformer's achieved FLOP/s against the peak a large matmul reaches in this run (float32 and, with
    native bf16, bfloat16), per variant; and, for PROFILED, where one call's time goes."""
    from diffstage.hardware import native_bf16
    from machine_limit import call_flops, peak_matmul_flops, time_shares

    def one_call(name):
        args_, kwargs = clocks[name].inputs
        return lambda: clocks[name].module(*args_, **kwargs)

    flops = call_flops(one_call("diffusers"))  # the same architecture and shapes for every variant
    peaks = {"float32": peak_matmul_flops(torch.float32)}
    if native_bf16(torch.device("cpu"))[0]:
        peaks["bfloat16"] = peak_matmul_flops(torch.bfloat16)
    report = {"transformer_flops_per_call": flops,
              "diffstage_float32_flops_per_call": call_flops(one_call("diffstage")) if "diffstage" in clocks else None,
              "peak_matmul_flops": {k: round(v) for k, v in peaks.items()}, "variants": {}}
    for name, r in results.items():
        if "teacache" in name:  # skipped steps run no blocks: FLOP/s would not mean the same
            continue
        precision = "bfloat16" if "bfloat16" in r["linear_weights"] and "bfloat16" in peaks else "float32"
        achieved = flops * r["transformer_calls_per_image"] / (r["transformer_per_step_s"] * args.steps)
        report["variants"][name] = {"achieved_flops": round(achieved), "against": precision,
                                    "fraction_of_peak": round(achieved / peaks[precision], 3)}
    for name in PROFILED:
        if name in clocks:
            report["variants"].setdefault(name, {})["time_shares"] = time_shares(one_call(name))
    return report


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, default=ROOT / ".cache" / "bench-flux",
                        help="where to build (or find) the bench checkpoint")
    parser.add_argument("--size", type=int, default=256, help="image height and width")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--text-len", type=int, default=64, help="max_sequence_length (T5 tokens)")
    parser.add_argument("--reps", type=int, default=5, help="timed rounds after the warm-up")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_flux.json")
    parser.add_argument("--memory-of", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if "diffusers" not in args.variants:
        parser.error("--variants must include diffusers (the baseline)")
    if args.memory_of:
        return measure_memory(args)

    from diffstage.hardware import cpu_info
    from diffstage.models.flux.tiny import build_tiny_flux

    build_tiny_flux(args.ckpt, variant="dev", size="bench")
    pipes, clocks = {}, {}
    for name in args.variants:
        t = time.perf_counter()
        pipes[name], module = load(name, args.ckpt)
        clocks[name] = TransformerClock(module)
        print(f"loaded {name} in {time.perf_counter() - t:.1f} s", file=sys.stderr)

    images, warmup = {}, {}
    for name in args.variants:  # warm-up: compiles, fills caches; its image is kept for PSNR
        t = time.perf_counter()
        images[name], _ = generate(name, pipes[name], args)
        warmup[name] = time.perf_counter() - t
        print(f"warm-up {name}: {warmup[name]:.2f} s", file=sys.stderr)

    runs = {name: {"wall": [], "transformer": [], "denoise": [], "calls": []} for name in args.variants}
    for rep in range(args.reps):
        for name in args.variants:
            clocks[name].reset()
            t = time.perf_counter()
            _, denoise = generate(name, pipes[name], args)
            wall = time.perf_counter() - t
            if VARIANTS[name][0] == "diffusers":
                denoise -= clocks[name].first_start
            runs[name]["wall"].append(wall)
            runs[name]["transformer"].append(clocks[name].total)
            runs[name]["denoise"].append(denoise)
            runs[name]["calls"].append(clocks[name].calls)
        print(f"round {rep + 1}/{args.reps}: " + ", ".join(f"{n} {runs[n]['wall'][-1]:.2f} s" for n in args.variants),
              file=sys.stderr)

    base = statistics.median(runs["diffusers"]["wall"])
    results = {}
    for name in args.variants:
        wall, tr, den = (statistics.median(runs[name][k]) for k in ("wall", "transformer", "denoise"))
        step, step_tr = den / args.steps, tr / args.steps
        # per-run differences, then their median (medians of different runs do not subtract)
        other = statistics.median(d - t for d, t in zip(runs[name]["denoise"], runs[name]["transformer"])) / args.steps
        library, dtype, overrides = VARIANTS[name]
        results[name] = {
            "library": library, "dtype": str(dtype)[6:], "overrides": overrides,
            "wall_s_median": round(wall, 4),
            "wall_s_all": [round(x, 4) for x in runs[name]["wall"]],
            "speedup_vs_diffusers": round(base / wall, 3),
            "warmup_s": round(warmup[name], 2),
            "linear_weights": linear_dtype(pipes[name]),  # what runtime auto (or the overrides) chose
            "denoise_step_s": round(step, 4),
            "transformer_calls_per_image": statistics.median(runs[name]["calls"]),
            "transformer_per_step_s": round(step_tr, 4),
            "other_per_step_s": round(other, 5),
            "other_share_of_step": round(other / step, 4),
            "psnr_vs_diffusers_db": None if name == "diffusers" else psnr(images[name], images["diffusers"]),
            "max_abs_diff_vs_diffusers": float(np.abs(images[name] - images["diffusers"]).max()),
        }
    for name in args.variants:
        results[name]["peak_rss_mb"] = round(peak_memory_mb(name, args), 1)
        results[name]["peak_rss_ratio_vs_diffusers"] = round(
            results[name]["peak_rss_mb"] / results["diffusers"]["peak_rss_mb"], 3) if name != "diffusers" else 1.0

    limit = machine_report(clocks, results, args)
    report = {
        "benchmark": "FLUX.1 [dev] architecture, random weights ('bench' size), end to end, one image",
        "settings": {"size": args.size, "steps": args.steps, "max_sequence_length": args.text_len,
                     "reps": args.reps, "seed": args.seed, "prompt": PROMPT},
        "machine": {**cpu_info(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "python": platform.python_version(),
                    "device": "cpu"},
        "results": results,
        "machine_limit": limit,
        "notes": "psnr_vs_diffusers_db null means the images are identical; other_per_step is the "
                 "denoising step minus its transformer call (scheduler, CFG, hooks, framework), timed for "
                 "Diffusers from the first transformer call to the last step callback and for diffstage over "
                 "the whole DenoisingStage; peak_rss is VmHWM of a fresh process (libraries, all modules "
                 "and file pages included). machine_limit: FLOPs of one transformer call counted from its "
                 "matmul and attention shapes (torch FlopCounterMode), achieved FLOP/s = FLOPs x calls per step / "
                 "transformer time per step, against the fastest 2048^3 matmul in this run (bfloat16 where the "
                 "variant's Linears are bf16 and the CPU has native bf16); time_shares: one call's op time by "
                 "category under torch.profiler (self CPU time).",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for name, r in results.items():
        print(f"{name:18s} {r['wall_s_median']:.3f} s  x{r['speedup_vs_diffusers']:.2f}  "
              f"psnr {r['psnr_vs_diffusers_db']}  peak {r['peak_rss_mb']} MB  "
              f"other/step {100 * r['other_share_of_step']:.2f}%")
    for name, v in limit["variants"].items():
        if "fraction_of_peak" in v:
            print(f"{name:18s} {v['achieved_flops'] / 1e9:.1f} GFLOP/s = {100 * v['fraction_of_peak']:.0f}% of the "
                  f"{v['against']} matmul peak" + (f"  shares {v['time_shares']}" if "time_shares" in v else ""))
    print(args.out)


if __name__ == "__main__":
    main()
