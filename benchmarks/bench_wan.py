"""Wan2.1 text-to-video: how close its transformer runs to this machine's limit.

    python benchmarks/bench_wan.py    # writes benchmarks/results/bench_wan.json (about 2 minutes)

The job is bench_parallel.py's Wan job (the bench-size checkpoint: Diffusers' WanTransformer3DModel, 6 heads x
32, 8 blocks; 256x256, 17 frames = 1280 video tokens, 64 text tokens, guidance 5.0 with a negative prompt,
4 steps), in one process with all of this machine's threads. Variants: diffstage in float32 and in bfloat16
(`runtime.dtype`: the stock transformer takes no `matmul_dtype`), and Diffusers' WanPipeline in both for
comparison (it runs the two CFG branches as two calls of batch 1; diffstage batches them into one call). A
warm-up video each, then --reps rounds running the variants in turn, so drift hits them alike.

Reported per variant: the transformer's time per call (bench_flux.TransformerClock), the FLOPs of one call
counted by torch's FlopCounterMode (machine_limit.call_flops; for diffstage's float32 call also from the layer
shapes, bench_parallel.wan_transformer_flops: they agree), the achieved FLOP/s against the fastest 2048^3 matmul
of the same run in the variant's dtype (bfloat16 only where the CPU has it natively), and where one call's time
goes by op category from a profile (machine_limit.time_shares): matmuls, attention, norms, other ops
(elementwise: modulation, RoPE, residuals, copies), and the part of the call no op accounts for (Python and
dispatch between ops); and the ops that take the most time, by name (`top_ops`)."""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_flux import TransformerClock  # noqa: E402
from bench_parallel import WAN_REQUEST, wan_transformer_flops, wan_video_tokens  # noqa: E402
from machine_limit import call_flops, peak_matmul_flops, time_shares  # noqa: E402

VARIANTS = {  # name -> (library, dtype)
    "diffstage": ("diffstage", "float32"),
    "diffstage_bf16": ("diffstage", "bfloat16"),
    "diffusers": ("diffusers", "float32"),
    "diffusers_bf16": ("diffusers", "bfloat16"),
}


def load(name: str, checkpoint: Path):
    library, dtype = VARIANTS[name]
    if library == "diffusers":
        from diffusers import WanPipeline

        pipe = WanPipeline.from_pretrained(checkpoint, torch_dtype=getattr(torch, dtype))
        pipe.set_progress_bar_config(disable=True)
        return pipe, pipe.transformer
    from diffstage import build_pipeline

    pipe = build_pipeline("wan_t2v", model_path=checkpoint,
                          overrides=["reuse.enabled=false", f"runtime.dtype={dtype}", "runtime.compile=false"])
    return pipe, pipe.modules["transformer"]


def generate(name: str, pipe, request: dict) -> np.ndarray:
    kwargs = {k: v for k, v in request.items() if k != "seed"}
    if VARIANTS[name][0] == "diffusers":
        return np.asarray(pipe(generator=torch.Generator("cpu").manual_seed(request["seed"]), **kwargs).frames)
    return np.asarray(pipe(seed=request["seed"], **kwargs).images)


def video_tokens(request: dict) -> int:
    return wan_video_tokens(request["height"], request["width"], request["num_frames"])


def shape_flops(module, batch: int, request: dict) -> int:
    """One call's FLOPs from the layer shapes of the bench checkpoint's transformer."""
    c = module.config
    return wan_transformer_flops(batch=batch, video_tokens=video_tokens(request),
                                 text_tokens=request["max_sequence_length"],
                                 hidden=c.num_attention_heads * c.attention_head_dim, ffn=c.ffn_dim,
                                 layers=c.num_layers, text_dim=c.text_dim, freq_dim=c.freq_dim,
                                 in_channels=c.in_channels, out_channels=c.out_channels, patch=tuple(c.patch_size))


def top_ops(call, n: int = 10) -> list[dict]:
    """The `n` ops with the most self time in one profiled call: their share of the op time, and the share of
    their whole time (children included: an rms_norm's pow, mean and mul count under it here, while
    time_shares files those children as "other ops")."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        call()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    return [{"op": e.key, "calls": e.count, "self_share": round(e.self_cpu_time_total / total, 4),
             "with_children_share": round(e.cpu_time_total / total, 4)}
            for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:n]]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, default=ROOT / ".cache" / "bench-wan")
    parser.add_argument("--reps", type=int, default=3, help="timed rounds after the warm-up")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_wan.json")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=INT",
                        help="change the request for a quick trial, e.g. height=64 width=64 num_frames=5")
    args = parser.parse_args(argv)
    request = {**WAN_REQUEST, **{k: int(v) for k, v in (item.split("=", 1) for item in args.set)}}

    import diffusers

    from diffstage.hardware import cpu_info, native_bf16
    from diffstage.models.wan.tiny import build_tiny_wan

    load_before = os.getloadavg()
    build_tiny_wan(args.ckpt, size="bench")
    pipes, clocks, videos, failed = {}, {}, {}, {}
    for name in list(args.variants):
        pipes[name], module = load(name, args.ckpt)
        clocks[name] = TransformerClock(module)
        try:
            videos[name] = generate(name, pipes[name], request)  # warm-up; its video is kept for the comparison
        except Exception as e:  # noqa: BLE001  a variant that does not run is reported, not timed
            failed[name] = f"{type(e).__name__}: {e}"
            args.variants.remove(name)
    runs = {name: {"wall": [], "transformer": [], "calls": []} for name in args.variants}
    for rep in range(args.reps):
        for name in args.variants:
            clocks[name].reset()
            start = time.perf_counter()
            generate(name, pipes[name], request)
            runs[name]["wall"].append(time.perf_counter() - start)
            runs[name]["transformer"].append(clocks[name].total)
            runs[name]["calls"].append(clocks[name].calls)
        print(f"round {rep + 1}/{args.reps}: " + ", ".join(f"{n} {runs[n]['wall'][-1]:.2f} s" for n in args.variants),
              file=sys.stderr)

    peaks = {"float32": peak_matmul_flops(torch.float32)}
    if native_bf16(torch.device("cpu"))[0]:
        peaks["bfloat16"] = peak_matmul_flops(torch.bfloat16)
    results = {}
    for name in args.variants:
        clock = clocks[name]
        call_args, call_kwargs = clock.inputs
        one_call = lambda: clock.module(*call_args, **call_kwargs)  # noqa: E731
        flops = call_flops(one_call)
        calls = statistics.median(runs[name]["calls"])
        per_call = statistics.median(t / c for t, c in zip(runs[name]["transformer"], runs[name]["calls"]))
        dtype = VARIANTS[name][1]
        against = dtype if dtype in peaks else "float32"
        batch = (call_kwargs["hidden_states"] if "hidden_states" in call_kwargs else call_args[0]).shape[0]
        shares = time_shares(one_call)
        shares["outside_ops"] = round(1 - shares["profiled_s"] / shares["wall_s_under_profiler"], 4)
        results[name] = {
            "library": VARIANTS[name][0], "dtype": dtype, "batch_per_call": batch, "calls_per_video": calls,
            "video_s_median": round(statistics.median(runs[name]["wall"]), 3),
            "transformer_s_per_call": round(per_call, 4),
            "transformer_share_of_video": round(statistics.median(
                t / w for t, w in zip(runs[name]["transformer"], runs[name]["wall"])), 4),
            "flops_per_call": flops, "flops_per_call_from_shapes": shape_flops(clock.module, batch, request),
            "achieved_flops": round(flops / per_call), "against": against,
            "fraction_of_peak": round(flops / per_call / peaks[against], 3),
            "max_abs_diff_vs_diffusers_float32": float(np.abs(videos[name].reshape(videos["diffusers"].shape)
                                                              - videos["diffusers"]).max())
            if "diffusers" in videos else None,
            "time_shares": shares,
            "top_ops": top_ops(one_call),
        }
    report = {
        "benchmark": "Wan2.1 T2V architecture, random weights ('bench' size): the transformer's FLOP/s against "
                     "the large-matmul peak of the same run",
        "settings": {**{k: v for k, v in request.items() if k != "output_type"}, "reps": args.reps,
                     "video_tokens": video_tokens(request)},
        "machine": {**cpu_info(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "diffusers": diffusers.__version__, "python": platform.python_version(), "device": "cpu",
                    "load_average_1_5_15_before": load_before, "load_average_1_5_15_after": os.getloadavg()},
        "peak_matmul_flops": {k: round(v) for k, v in peaks.items()},
        "results": results,
        "failed": failed,
        "notes": "achieved FLOP/s = FLOPs of one call (FlopCounterMode: matmuls, convolutions, attention) / the "
                 "median transformer time per call in the timed rounds; time_shares: one call under "
                 "torch.profiler, op self time by category as a share of the profiled op time, outside_ops the "
                 "share of the call's wall time under the profiler that no op accounts for.",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for name, r in results.items():
        print(f"{name:15s} {r['video_s_median']:.2f} s/video  {r['transformer_s_per_call']:.3f} s/call  "
              f"{r['achieved_flops'] / 1e9:.1f} GFLOP/s = {100 * r['fraction_of_peak']:.0f}% of the {r['against']} "
              f"peak  shares {r['time_shares']}")
    print(args.out)


if __name__ == "__main__":
    main()
