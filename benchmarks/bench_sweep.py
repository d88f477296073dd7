"""A 9-job sweep on the embedded `digits` model: stage-output reuse on and off, against Diffusers.

    python benchmarks/bench_sweep.py          # writes benchmarks/results/bench_sweep.json

The jobs are seed in {0, 1, 2} x true_cfg_scale in {2, 4, 6} with one prompt, so only the text
encoding could be shared between them. Measured, on the same checkpoint:

- in one process, 9 requests to a pipeline built once: Diffusers' FluxPipeline (it encodes the
  prompt on every call), diffstage with reuse off, and with reuse on;
- from the command line: `diffstage generate -m seed=0,1,2 sampling.true_cfg_scale=2,4,6` with reuse
  on and off (one process, weights loaded once), and the same 9 jobs as 9 separate processes.

Each variant reports wall time and how often the text encoders ran (in process: prompt encodings, a
prompt or a negative prompt each; on the command line: TextEncodingStage runs); medians over rounds for
the in-process variants (after a warm-up each), one run each for the command-line ones."""
from __future__ import annotations

import argparse
import itertools
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cfg_batch import CKPT  # noqa: E402

from diffstage.hardware import cpu_info  # noqa: E402  (the machine description every benchmark records)

PROMPT = "a handwritten digit seven"
SEEDS, SCALES = (0, 1, 2), (2.0, 4.0, 6.0)
JOBS = list(itertools.product(SEEDS, SCALES))
EXE = Path(sys.executable).with_name("diffstage")


def diffusers_loop(pipe, counter: list) -> list[np.ndarray]:
    out = []
    for seed, scale in JOBS:
        out.append(pipe(PROMPT, negative_prompt="", true_cfg_scale=scale, guidance_scale=0.0, height=32, width=32,
                        num_inference_steps=20, max_sequence_length=16, output_type="np",
                        generator=torch.Generator("cpu").manual_seed(seed)).images)
    return out


def diffstage_loop(pipe, counter: list) -> list[np.ndarray]:
    out = []
    for seed, scale in JOBS:
        result = pipe(PROMPT, seed=seed, true_cfg_scale=scale, output_type="np")
        counter.append(0 if "1:TextEncodingStage" in result.reused else 1)
        out.append(result.images)
    return out


def in_process(rounds: int) -> dict:
    from diffusers import FluxPipeline

    from diffstage import build_pipeline
    from diffstage.session import default_session

    ref = FluxPipeline.from_pretrained(CKPT, torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    encode = ref.encode_prompt
    calls = {"n": 0}

    def counted(*a, **k):
        calls["n"] += 1
        return encode(*a, **k)

    ref.encode_prompt = counted
    variants = {"diffusers": (ref, diffusers_loop),
                "diffstage_reuse_off": (build_pipeline("digits", overrides=["reuse.enabled=false"]), diffstage_loop),
                "diffstage_reuse_on": (build_pipeline("digits"), diffstage_loop)}
    times = {name: [] for name in variants}
    encodes, images = {}, {}
    for name, (pipe, loop) in variants.items():  # warm-up
        loop(pipe, [])
    for _ in range(rounds):
        for name, (pipe, loop) in variants.items():
            default_session().reuse.clear()  # every round starts cold: what a new sweep would see
            calls["n"], counter = 0, []
            start = time.perf_counter()
            images[name] = loop(pipe, counter)
            times[name].append(time.perf_counter() - start)
            # prompt encodings (a prompt or a negative prompt through the text encoders): one per encode_prompt
            # call in Diffusers; two per TextEncodingStage run in diffstage (true CFG: prompt and negative)
            encodes[name] = calls["n"] if name == "diffusers" else 2 * sum(counter)
    base = statistics.median(times["diffusers"])
    return {name: {"median_s": round(statistics.median(t), 4), "prompt_encodings": encodes[name],
                   "speedup_vs_diffusers": round(base / statistics.median(t), 3),
                   "max_abs_diff_vs_diffusers": float(max(np.abs(a - b).max() for a, b in
                                                          zip(images[name], images["diffusers"])))}
            for name, t in times.items()}


def cli(args: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    subprocess.run([str(EXE), *args], cwd=cwd, check=True, capture_output=True,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return time.perf_counter() - start


def command_line() -> dict:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sweep = ["generate", "-m", "seed=0,1,2", "sampling.true_cfg_scale=2,4,6"]
        for name, extra in (("sweep_reuse_on", []), ("sweep_reuse_off", ["reuse.enabled=false"])):
            seconds = cli([*sweep, *extra, f"hydra.sweep.dir={tmp / name}"], tmp)
            rows = [json.loads(line) for line in (tmp / name / "sweep.jsonl").read_text().splitlines()]
            results[name] = {"wall_s": round(seconds, 2), "jobs": len(rows),
                             "text_encoding_stage_runs": sum("1:TextEncodingStage" not in r["reused"] for r in rows)}
        seconds = sum(cli(["generate", f"seed={seed}", f"sampling.true_cfg_scale={scale}",
                           f"hydra.run.dir={tmp / 'separate' / str(i)}"], tmp) for i, (seed, scale) in enumerate(JOBS))
        results["nine_processes"] = {"wall_s": round(seconds, 2), "jobs": len(JOBS), "text_encoding_stage_runs": len(JOBS)}
    base = results["nine_processes"]["wall_s"]
    for r in results.values():
        r["speedup_vs_nine_processes"] = round(base / r["wall_s"], 2)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "bench_sweep.json")
    args = p.parse_args()
    torch.manual_seed(0)
    report = {
        "benchmark": "digits, 9 jobs (seed x true_cfg_scale, one prompt): stage-output reuse vs Diffusers",
        "settings": {"seeds": list(SEEDS), "true_cfg_scales": list(SCALES), "prompt": PROMPT, "rounds": args.rounds,
                     "num_inference_steps": 20, "height": 32, "width": 32},
        "machine": {**cpu_info(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "python": platform.python_version(), "device": "cpu"},
        "in_process": in_process(args.rounds),
        "command_line": command_line(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("in_process", "command_line")}, indent=2))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
