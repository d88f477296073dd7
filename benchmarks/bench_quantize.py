"""runtime.quantize on the CPU: int8 weights (torchao) against float32 on the bench-size FLUX checkpoint.

    python benchmarks/bench_quantize.py        # writes benchmarks/results/bench_quantize.json

Builds the "bench" random-weight FLUX.1 [dev] checkpoint (as bench_flux.py does), then, in this one process,
times each variant on the same prompt, seed, size and steps: a warm-up call each (it compiles where
runtime.compile=true), then `--reps` interleaved rounds; reports the median seconds per image, the PSNR of
each image against float32's, the transformer's weight bytes (a quantized tensor counted by its int8 data and
scales), and the memory of a fresh process per variant that loads the pipeline and makes one image: its peak
RSS (VmHWM), its RSS once the pipeline is built and after the image (VmRSS)."""
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
PROMPT = "a photo of a red fox in the snow"
BASE = ["runtime.dtype=float32", "runtime.matmul_dtype=null", "runtime.kernels=reference", "runtime.compile=false"]
VARIANTS = {  # name -> overrides after BASE
    "float32": [],
    "int8": ["runtime.quantize=int8"],
    "int8_dynamic": ["runtime.quantize=int8_dynamic"],
    "int8_compile": ["runtime.quantize=int8", "runtime.compile=true"],
    "int8_all": ["runtime.quantize=int8", "runtime.quantize_modules=[transformer,text_encoder,text_encoder_2]"],
    "bf16_matmul": ["runtime.matmul_dtype=bfloat16"],  # the existing low-precision option, for comparison
}


def load(variant: str, ckpt: Path):
    from diffstage import build_pipeline

    return build_pipeline("flux", model_path=ckpt, overrides=[*BASE, *VARIANTS[variant]])


def generate(pipe, args) -> np.ndarray:
    return pipe(PROMPT, seed=args.seed, height=args.size, width=args.size, num_inference_steps=args.steps,
                guidance_scale=3.5, max_sequence_length=args.text_len, output_type="np").images


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds: a tensor subclass (torchao's quantized weights) by its inner tensors."""
    if type(t) not in (torch.Tensor, torch.nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def weight_mb(module: torch.nn.Module) -> float:
    return round(sum(tensor_bytes(p) for p in module.parameters()) / 2 ** 20, 2)


def psnr(a: np.ndarray, b: np.ndarray) -> float | None:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return None if mse == 0 else round(10 * math.log10(1.0 / mse), 2)  # None: identical images


def memory_of(variant: str, args) -> dict:
    """Peak and final RSS (MB) of a fresh process that loads `variant` and makes one image."""
    cmd = [sys.executable, __file__, "--memory-of", variant, "--ckpt", str(args.ckpt), "--size", str(args.size),
           "--steps", str(args.steps), "--text-len", str(args.text_len)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def status_mb() -> dict[str, float]:
    return {line.split(":")[0]: round(int(line.split()[1]) / 1024, 1) for line in
            Path("/proc/self/status").read_text().splitlines() if line.startswith(("VmHWM:", "VmRSS:"))}


def measure_memory(args) -> None:
    pipe = load(args.memory_of, args.ckpt)
    loaded = status_mb()
    generate(pipe, args)
    end = status_mb()
    print(json.dumps({"peak_rss_mb": end["VmHWM"], "rss_after_load_mb": loaded["VmRSS"],
                      "rss_after_image_mb": end["VmRSS"]}))


def timed_rounds(pipes: dict, args) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and CPU seconds per image of each variant, interleaved rounds. CPU time (all of this process's
    threads) is less disturbed than wall time when other work shares the machine."""
    walls, cpus = {name: [] for name in pipes}, {name: [] for name in pipes}
    for rep in range(args.reps):
        for name, pipe in pipes.items():
            t, c = time.perf_counter(), time.process_time()
            generate(pipe, args)
            walls[name].append(time.perf_counter() - t)
            cpus[name].append(time.process_time() - c)
        print(f"round {rep + 1}/{args.reps}: " + ", ".join(f"{n} {w[-1]:.2f} s" for n, w in walls.items()),
              file=sys.stderr)
    return walls, cpus


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, default=ROOT / ".cache" / "bench-flux",
                        help="where to build (or find) the bench checkpoint")
    parser.add_argument("--size", type=int, default=256, help="image height and width")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--text-len", type=int, default=64, help="max_sequence_length (T5 tokens)")
    parser.add_argument("--reps", type=int, default=7, help="timed rounds after the warm-up")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_quantize.json")
    parser.add_argument("--memory-of", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_of:
        return measure_memory(args)

    from diffstage.hardware import cpu_info
    from diffstage.models.flux.tiny import build_tiny_flux
    from diffstage.session import default_session

    build_tiny_flux(args.ckpt, variant="dev", size="bench")
    pipes, images, warmup = {}, {}, {}
    for name in VARIANTS:
        default_session().clear()  # each variant loads its own modules (int8_all's encoders are not float32's)
        pipes[name] = load(name, args.ckpt)
        t = time.perf_counter()
        images[name] = generate(pipes[name], args)  # warm-up (compiles): its image is kept for PSNR
        warmup[name] = time.perf_counter() - t
        print(f"warm-up {name}: {warmup[name]:.2f} s", file=sys.stderr)
    walls, cpus = timed_rounds(pipes, args)
    base, cpu_base = statistics.median(walls["float32"]), statistics.median(cpus["float32"])
    results = {}
    for name, pipe in pipes.items():
        wall = statistics.median(walls[name])
        results[name] = {
            "overrides": [*BASE, *VARIANTS[name]], "s_per_image_median": round(wall, 4),
            "s_per_image_all": [round(w, 4) for w in walls[name]], "speedup_vs_float32": round(base / wall, 3),
            "s_per_image_min": round(min(walls[name]), 4),
            "speedup_vs_float32_min": round(min(walls["float32"]) / min(walls[name]), 3),
            "cpu_s_per_image_median": round(statistics.median(cpus[name]), 4),
            "cpu_speedup_vs_float32": round(cpu_base / statistics.median(cpus[name]), 3),
            "warmup_s": round(warmup[name], 2), "psnr_vs_float32_db": psnr(images[name], images["float32"]),
            "weight_mb": {m: weight_mb(pipe.modules[m]) for m in ("transformer", "text_encoder", "text_encoder_2")},
            **memory_of(name, args)}
    report = {
        "benchmark": "runtime.quantize: FLUX.1 [dev] architecture, random weights ('bench' size), one image, CPU",
        "settings": {"size": args.size, "steps": args.steps, "max_sequence_length": args.text_len,
                     "reps": args.reps, "seed": args.seed, "prompt": PROMPT},
        "machine": {**cpu_info(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "torchao": __import__("torchao").__version__, "python": platform.python_version(),
                    "device": "cpu"},
        "results": results,
        "notes": "psnr null: identical images. weight_mb: the module's parameters (a torchao weight by its int8 "
                 "data and scales). peak_rss_mb: VmHWM of a fresh process that loads the variant and makes one "
                 "image (libraries and file pages included; a module is quantized after it loads, so the peak "
                 "holds its float32 weights once); rss_after_load_mb / rss_after_image_mb: VmRSS once built and at "
                 "its end. int8_compile: runtime.compile="
                 "true with int8 weights (the compile test of quantized native blocks; too slow for a unit test). "
                 "s_per_image: wall time (median and fastest of the interleaved rounds: on a shared machine the "
                 "fastest is the one least disturbed); cpu_s_per_image: this process's CPU time (its threads "
                 "together). Compare variants within this file.",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for name, r in results.items():
        print(f"{name:14s} {r['s_per_image_median']:.3f} s  x{r['speedup_vs_float32']:.2f}  "
              f"min {r['s_per_image_min']:.3f} s  x{r['speedup_vs_float32_min']:.2f}  "
              f"cpu {r['cpu_s_per_image_median']:.3f} s  x{r['cpu_speedup_vs_float32']:.2f}  "
              f"psnr {r['psnr_vs_float32_db']}  weights {r['weight_mb']}  peak {r['peak_rss_mb']} MB  "
              f"built {r['rss_after_load_mb']} MB  after {r['rss_after_image_mb']} MB")
    print(args.out)


if __name__ == "__main__":
    main()
