"""Peak memory of one video decode: whole, with the VAE's own tiling (runtime.vae_tiling), and patch-parallel, one
band of latent rows per rank (runtime.vae_parallel), on a bench-size Wan VAE.

    python benchmarks/bench_vae_decode.py    # writes benchmarks/results/vae_decode.json (about 4 minutes)

The VAE: Diffusers' AutoencoderKLWan shaped as Wan2.1's (z_dim 16, dim_mult [1, 2, 4, 4], 2 res blocks, temporal
downsampling [false, true, true], its mid-block attention) but base_dim 32 instead of 96, so that a decode takes
seconds on a CPU; random weights (seed 0), float32. The job: a 5 x 32 x 32 latent, i.e. 17 frames of 256x256.

Each variant runs in a fresh process, decoding through DecodingStage.decode as a pipeline would (the tiling set
for the decode and put back after it; the bands split and all-gathered as under torchrun):
  - whole: one decode;
  - tiled: runtime.vae_tiling=true, runtime.vae_tile_size=128 (tiles of 16 latent rows and columns, 12 apart);
  - parallel: runtime.vae_parallel=true on 2 gloo ranks under torchrun (bands of 16 latent rows, halo 8), each
    rank measured on its own; the figure is the larger rank's.
Memory: the process's peak resident set during the decode (VmHWM, reset through /proc/self/clear_refs just
before it) minus its resident set just before (VAE weights and latent already there, and a small decode done so
that one-time library set-up does not count): what the decode adds, the
decoded frames included. Linux only. Frames are compared with the whole decode's (max and mean |Δ|, frames in
[0, 1] as a pipeline returns them). Times are for the record, on a shared machine."""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
LATENT = (1, 16, 5, 32, 32)  # 17 frames of 256x256
VAE_CONFIG = dict(base_dim=32, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                  temperal_downsample=[False, True, True])
TILE = 128
VARIANTS = {"whole": {}, "tiled": {"vae_tiling": True, "vae_tile_size": TILE}, "parallel": {"vae_parallel": True}}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def run_variant(name: str, out_dir: Path) -> None:
    """In this (fresh) process: build the VAE, decode once as `name` asks, write the frames and the figures."""
    from diffusers import AutoencoderKLWan

    from diffstage.distributed import current, init_parallel
    from diffstage.stages import DecodingStage
    from diffstage.vae_decode import attach_decode_options

    if name == "parallel":
        init_parallel({"cfg": 2}, torch.device("cpu"))  # joins the gloo group torchrun set up
    torch.manual_seed(0)
    vae = AutoencoderKLWan(**VAE_CONFIG).eval()
    stage = DecodingStage(vae)
    attach_decode_options([stage], VARIANTS[name], "bench")
    latents = torch.randn(*LATENT, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # a small decode first: the libraries' one-time set-up is not the decode's memory
        stage.decode(latents[:, :, :1, :8, :8])
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := RSS now
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    with torch.no_grad():
        frames = stage.decode(latents)
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    rank = current().rank
    if rank == 0:
        np.save(out_dir / f"{name}.npy", (frames.float() * 0.5 + 0.5).clamp(0, 1).numpy())
    figures = {"peak_mib": round((peak - before) / 1024, 1), "before_mib": round(before / 1024, 1),
               "seconds": round(seconds, 2), "threads": torch.get_num_threads()}
    (out_dir / f"{name}-rank{rank}.json").write_text(json.dumps(figures))


def launch(name: str, out_dir: Path) -> list[dict]:
    """Run a variant in fresh processes (torchrun for the parallel one); each rank's figures."""
    me = [str(Path(__file__).resolve()), "--variant", name, "--work", str(out_dir)]
    if name == "parallel":
        cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc-per-node=2", *me]
    else:
        cmd = [sys.executable, *me]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DIFFSTAGE_DIST_TIMEOUT": "600"}
    if name == "parallel":  # two ranks share the machine's cores, as one process has them all
        env["OMP_NUM_THREADS"] = str(max(1, torch.get_num_threads() // 2))
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if r.returncode:
        raise SystemExit(f"{name} failed:\n{r.stderr[-3000:]}")
    return [json.loads(p.read_text()) for p in sorted(out_dir.glob(f"{name}-rank*.json"))]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=tuple(VARIANTS), help=argparse.SUPPRESS)  # a child process
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "vae_decode.json")
    args = parser.parse_args(argv)
    if args.variant:
        return run_variant(args.variant, args.work)

    import diffusers

    from diffstage.hardware import cpu_info

    results = {}
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        for name in VARIANTS:
            ranks = launch(name, work)
            results[name] = {"peak_mib": max(r["peak_mib"] for r in ranks), "seconds": max(r["seconds"] for r in ranks),
                             **({"ranks": ranks} if len(ranks) > 1 else ranks[0])}
        whole = np.load(work / "whole.npy")
        for name in VARIANTS:
            diff = np.abs(np.load(work / f"{name}.npy") - whole)
            results[name].update(max_abs_diff_vs_whole=float(diff.max()), mean_abs_diff_vs_whole=float(diff.mean()),
                                 peak_vs_whole=round(results[name]["peak_mib"] / results["whole"]["peak_mib"], 3))
    report = {
        "benchmark": "peak memory of one video VAE decode: whole, tiled, patch-parallel (2 ranks)",
        "settings": {"vae": {"class": "AutoencoderKLWan", **VAE_CONFIG}, "latent": list(LATENT),
                     "frames": f"{(LATENT[2] - 1) * 4 + 1} x {LATENT[3] * 8}x{LATENT[4] * 8}", "dtype": "float32",
                     "variants": VARIANTS, "halo_latent_rows": 8},
        "machine": {**cpu_info(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "diffusers": diffusers.__version__, "python": platform.python_version(), "device": "cpu"},
        "results": results,
        "notes": "peak_mib: peak resident set during the decode (VmHWM reset just before) minus the resident set "
                 "before it, in a fresh process per variant (per rank for parallel; the larger rank's); the decoded "
                 "frames are included. |Δ| over frames in [0, 1] against the whole decode; random weights, so the "
                 "mid-block attention (which mixes a whole frame and which tiles and bands cannot see whole) "
                 "weighs more than in a trained VAE.",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for name, r in results.items():
        print(f"{name:9s} peak +{r['peak_mib']:8.1f} MiB ({r['peak_vs_whole']:.2f}x whole)  {r['seconds']:6.1f} s  "
              f"max|Δ| {r['max_abs_diff_vs_whole']:.3g}  mean|Δ| {r['mean_abs_diff_vs_whole']:.3g}")


if __name__ == "__main__":
    main()
