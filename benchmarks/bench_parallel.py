"""Parallel execution on this CPU, 1 vs 2 processes per mode, and a projection for FLUX.1-dev on GPUs.

    python benchmarks/bench_parallel.py        # writes benchmarks/results/bench_parallel.json

Measured: the bench-size FLUX checkpoint (benchmarks/bench_flux.py's: hidden 768, 12 heads, 2 double +
4 single blocks), 256x256 (256 image tokens) with 64 text tokens, true CFG (a negative prompt), float32,
4 steps. One process with 2 threads, then `torchrun --nproc-per-node=2` with parallel.cfg=2,
parallel.ulysses=2 and parallel.ring=2 (one thread per process: the same two cores). Each rank counts
the bytes it sends in the parallel collectives; per step they are compared with the formula below.

Projected: the same formula for FLUX.1-dev (hidden 3072 = 24 heads x 128, 19 + 38 blocks, 512 text
tokens) at 1024x1024 (4096 image tokens) and 2048x2048 (16384), true CFG batched, bf16, on 2/4/8 GPUs
joined by NVLink 4 (450 GB/s each way per GPU, H100 SXM) or PCIe 5 x16 (64 GB/s), against compute at
400 TFLOP/s per GPU (about 40% of an H100's dense bf16 peak). Communication is counted as not
overlapped with compute, so the projected speedups are lower bounds for Ring (whose transfers can hide
behind the block computations) and about right for Ulysses and CFG (which wait for theirs).

Per rank and denoising step, with B the batch the transformer sees, S = text + image tokens, H x D the
attention width, L the attention layers, P the degree, b bytes per value:
    ulysses: 4 all-to-alls (q, k, v, out) per layer:    L * 4 * B * (S / P) * H * D * b * (P - 1) / P
    ring:    keys and values, P - 1 hops per layer:      L * 2 * B * (S / P) * H * D * b * (P - 1)
    cfg:     one all-gather of the prediction per step:  (B / 2) * S_image * C_out * b
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

STEPS, SIZE, TEXT = 4, 256, 64
REQUEST = dict(prompt="a red fox in the snow", negative_prompt="blurry", true_cfg_scale=4.0, seed=0,
               num_inference_steps=STEPS, height=SIZE, width=SIZE, max_sequence_length=TEXT, output_type="np")
MODES = {"one_process": {}, "cfg": {"cfg": 2}, "ulysses": {"ulysses": 2}, "ring": {"ring": 2}}
GPU_FLOPS = 400e12
LINKS = {"nvlink4": 450e9, "pcie5": 64e9}


def volume_per_step(mode: str, p: int, *, batch: int, text: int, image: int, heads: int, head_dim: int,
                    layers: int, out_channels: int, nbytes: int) -> float:
    """Bytes one rank sends per denoising step (the formula in the module docstring)."""
    s = text + image
    if mode == "ulysses":
        return layers * 4 * batch * (s / p) * heads * head_dim * nbytes * (p - 1) / p
    if mode == "ring":
        return layers * 2 * batch * (s / p) * heads * head_dim * nbytes * (p - 1)
    if mode == "cfg":
        return (batch / 2) * image * out_channels * nbytes
    return 0.0


def worker(out_dir: Path, checkpoint: Path, mode: str, reps: int) -> None:
    """Run under torchrun (or alone for one_process): time the pipeline, count what rank 0 sends."""
    from diffstage import build_pipeline
    from diffstage.distributed import current
    from diffstage.distributed.sequence import TRAFFIC

    overrides = [f"parallel.{k}={v}" for k, v in MODES[mode].items()] + ["reuse.enabled=false"]
    pipe = build_pipeline("flux", model_path=checkpoint, overrides=overrides)
    pipe(**REQUEST)  # warm-up
    times = []
    for _ in range(reps):
        TRAFFIC["bytes"] = 0
        start = time.perf_counter()
        images = pipe(**REQUEST).images
        times.append(time.perf_counter() - start)
    if current().rank == 0:
        import numpy as np

        np.save(out_dir / f"{mode}.npy", images)
        (out_dir / f"{mode}.json").write_text(json.dumps({"times": times, "bytes_per_run": TRAFFIC["bytes"]}))


def measure(checkpoint: Path, reps: int) -> dict:
    import numpy as np

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for mode in MODES:
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
            me = [str(Path(__file__).resolve()), "--worker", mode, "--tmp", str(tmp), "--ckpt", str(checkpoint),
                  "--reps", str(reps)]
            if mode == "one_process":
                cmd = [sys.executable, *me]
            else:
                env["OMP_NUM_THREADS"] = "1"
                cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc-per-node=2", *me]
            subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=1800)
            data = json.loads((tmp / f"{mode}.json").read_text())
            results[mode] = {"median_s": round(statistics.median(data["times"]), 3),
                             "bytes_sent_per_step": data["bytes_per_run"] / STEPS}
        base = results["one_process"]["median_s"]
        reference = np.load(tmp / "one_process.npy")
        for mode, r in results.items():
            r["speedup_vs_one_process"] = round(base / r["median_s"], 3)
            r["max_abs_diff_vs_one_process"] = float(np.abs(np.load(tmp / f"{mode}.npy") - reference).max())
    return results


def bench_dims() -> dict:
    # 256x256 with the bench VAE (8x) and 2x2 patches: 16 x 16 image tokens; CFG batched: B = 2
    return dict(batch=2, text=TEXT, image=(SIZE // 16) ** 2, heads=12, head_dim=64, layers=6, out_channels=64,
                nbytes=4)


def projection() -> dict:
    """FLUX.1-dev on GPUs (see the module docstring for the assumptions)."""
    params, heads, head_dim, layers, text = 11.9e9, 24, 128, 19 + 38, 512
    out = {}
    for side in (1024, 2048):
        image = (side // 16) ** 2
        s = text + image
        flops = 2 * (2 * params * s + 4 * s * s * heads * head_dim * layers)  # B = 2 (true CFG), per step
        one_gpu = flops / GPU_FLOPS
        for p in (2, 4, 8):
            layouts = {"ulysses": {"ulysses": p}, "ring": {"ring": p}}
            layouts["cfg" if p == 2 else f"cfg2_ulysses{p // 2}"] = {"cfg": 2, "ulysses": p // 2} if p > 2 else {"cfg": 2}
            for name, layout in layouts.items():
                dims = dict(text=text, image=image, heads=heads, head_dim=head_dim, layers=layers,
                            out_channels=64, nbytes=2)
                u = layout.get("ulysses", 1)
                sent = volume_per_step("cfg", 2, batch=2, **dims) if layout.get("cfg") else 0.0
                batch = 1 if layout.get("cfg") else 2  # a CFG rank runs one branch
                if u > 1:
                    sent += volume_per_step("ulysses", u, batch=batch, **dims)
                if layout.get("ring", 1) > 1:
                    sent += volume_per_step("ring", layout["ring"], batch=batch, **dims)
                row = {"bytes_per_step_per_gpu": round(sent), "compute_s_per_step": round(one_gpu / p, 4)}
                for link, bandwidth in LINKS.items():
                    comm = sent / bandwidth
                    row[f"comm_s_{link}"] = round(comm, 4)
                    row[f"speedup_{link}"] = round(one_gpu / (one_gpu / p + comm), 2)
                out[f"{side}x{side}/{p}gpu/{name}"] = row
        out[f"{side}x{side}/1gpu"] = {"compute_s_per_step": round(one_gpu, 4)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--ckpt", type=Path, default=ROOT / ".cache" / "bench-flux")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_parallel.json")
    p.add_argument("--worker", choices=list(MODES), help=argparse.SUPPRESS)
    p.add_argument("--tmp", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.tmp, args.ckpt, args.worker, args.reps)

    import torch

    from bench_cfg_batch import cpu_info
    from diffstage.models.flux.tiny import build_tiny_flux

    build_tiny_flux(args.ckpt, variant="dev", size="bench")
    measured = measure(args.ckpt, args.reps)
    for mode, r in measured.items():
        if mode != "one_process":
            r["formula_bytes_per_step"] = volume_per_step(mode, 2, **bench_dims())
    report = {
        "benchmark": "bench-size FLUX, 256x256, 64 text tokens, true CFG, float32: 1 vs 2 processes per mode",
        "settings": {"steps": STEPS, "reps": args.reps, "threads_total": 2, **{k: v for k, v in REQUEST.items()
                                                                                if k != "output_type"}},
        "machine": {**cpu_info(), "torch": torch.__version__, "python": platform.python_version(),
                    "device": "cpu", "backend": "gloo"},
        "measured": measured,
        "projection_flux1_dev": {"assumptions": {"gpu_flops": GPU_FLOPS, "links_bytes_per_s": LINKS,
                                                 "dtype": "bfloat16", "true_cfg": True, "overlap": "none"},
                                 "rows": projection()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["measured"], indent=2))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
