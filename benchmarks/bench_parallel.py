"""Parallel execution on this CPU, 1 vs 2 processes per mode, and projections for FLUX.1-dev and Wan2.1-14B on GPUs.

    python benchmarks/bench_parallel.py              # FLUX: writes benchmarks/results/bench_parallel.json
    python benchmarks/bench_parallel.py --model wan  # Wan:  writes benchmarks/results/bench_parallel_wan.json

Measured, FLUX: the bench-size FLUX checkpoint (benchmarks/bench_flux.py's: hidden 768, 12 heads, 2 double +
4 single blocks), 256x256 (256 image tokens) with 64 text tokens, true CFG (a negative prompt), float32,
4 steps. Measured, Wan: the bench-size Wan2.1 text-to-video checkpoint (diffstage.models.wan.tiny SIZES["bench"]:
6 heads x 32, 8 blocks; Diffusers' own WanTransformer3DModel, split by its _cp_plan), 256x256, 17 frames
(5 latent frames x 16 x 16 = 1280 video tokens), 64 text tokens, CFG 5.0 with a negative prompt, float32,
4 steps. Each: one process with 2 threads (and with 1), then `torchrun --nproc-per-node=2` with parallel.cfg=2,
parallel.ulysses=2 and parallel.ring=2 (one thread per process: the same two cores); a warm-up call, then
--reps timed calls, whole and their denoising loop. Each rank counts the bytes it sends in the parallel
collectives; per step they are compared with the formula below. For Wan,
Diffusers' WanPipeline runs the same job in one process and with its own
`transformer.enable_parallelism(ContextParallelConfig(ulysses_degree=2 | ring_degree=2))` (see
`diffusers_worker` for what it takes on a CPU; its Ulysses all-to-alls are counted as ours are).

Projected: the same formula for FLUX.1-dev (hidden 3072 = 24 heads x 128, 19 + 38 blocks, 512 text
tokens) at 1024x1024 (4096 image tokens) and 2048x2048 (16384), and for Wan2.1-14B (hidden 5120 = 40 heads
x 128, 40 blocks, FFN 13824, 512 text tokens, VAE 8x spatial and 4x temporal, patches 1x2x2) at 480x832 and
720x1280 with 81 frames (21 latent frames: 32760 and 75600 video tokens), true CFG batched, bf16, on 2/4/8
GPUs joined by NVLink 4 (450 GB/s each way per GPU, H100 SXM) or PCIe 5 x16 (64 GB/s), against compute at
400 TFLOP/s per GPU (about 40% of an H100's dense bf16 peak). FLUX's FLOPs: 2 x parameters per token plus
attention; Wan's: counted from its layer shapes (`wan_transformer_flops`, equal to torch's FlopCounterMode
count on the real class, tests/test_bench_parallel_wan.py). Communication is counted as not overlapped with
compute, so the projected speedups are lower bounds for Ring (whose transfers can hide behind the block
computations) and about right for Ulysses and CFG (which wait for theirs).

Per rank and denoising step, with B the batch the transformer sees, S the tokens the split attention runs over
(FLUX: text + image, its joint attention; Wan: the video tokens of its self-attention only: the text is not
split, and the cross-attention to it runs on each rank with nothing sent), H x D the attention width, L the
split attention layers, P the degree, b bytes per value (splits even, as in the measured jobs):
    ulysses: 4 all-to-alls (q, k, v, out) per layer:    L * 4 * B * (S / P) * H * D * b * (P - 1) / P
    ring:    keys and values, P - 1 hops per layer:      L * 2 * B * (S / P) * H * D * b * (P - 1)
    cfg:     one all-gather of the prediction per step:  (B / 2) * S_out * C_out * b
(S_out: the image or video tokens, C_out: output values per token, 16 channels x 2 x 2 for both). Not counted:
the sequence lengths the ranks exchange before each all-to-all or ring (one integer each) and the gather of the
transformer's output (sequence modes; FLUX's native transformer gathers it the same way).
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
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

STEPS, SIZE, TEXT = 4, 256, 64
REQUEST = dict(prompt="a red fox in the snow", negative_prompt="blurry", true_cfg_scale=4.0, seed=0,
               num_inference_steps=STEPS, height=SIZE, width=SIZE, max_sequence_length=TEXT, output_type="np")
WAN_REQUEST = dict(prompt="a red fox running through fresh snow", negative_prompt="blurry", guidance_scale=5.0,
                   seed=0, num_inference_steps=STEPS, height=SIZE, width=SIZE, num_frames=17,
                   max_sequence_length=TEXT, output_type="np")
MODES = {"one_process": {}, "one_process_1thread": {}, "cfg": {"cfg": 2}, "ulysses": {"ulysses": 2},
         "ring": {"ring": 2}}
# the modes run in one process (the others under torchrun, 2 processes of one thread each). "one_process" has all
# the machine's threads (the baseline); on a machine other jobs share, its two threads lose more waiting on each
# other than two one-thread processes do, so "one_process_1thread" tells how much of a speedup the split itself gives
ONE_PROCESS = ("one_process", "one_process_1thread", "diffusers_one_process")
# Diffusers' own context parallelism (no CFG parallel there): mode -> ContextParallelConfig arguments
DIFFUSERS_MODES = {"diffusers_one_process": {}, "diffusers_ulysses": {"ulysses_degree": 2},
                   "diffusers_ring": {"ring_degree": 2}}
JOBS = {  # --model -> the pipeline, its request, the bench checkpoint's folder under .cache, the results file
    "flux": ("flux", REQUEST, "bench-flux", "bench_parallel.json"),
    "wan": ("wan_t2v", WAN_REQUEST, "bench-wan", "bench_parallel_wan.json"),
}
GPU_FLOPS = 400e12
LINKS = {"nvlink4": 450e9, "pcie5": 64e9}
# Wan2.1-T2V-14B's transformer (its config.json): dims for wan_transformer_flops and the volume formula
WAN_14B = dict(hidden=5120, heads=40, head_dim=128, layers=40, ffn=13824, text_dim=4096, freq_dim=256,
               in_channels=16, out_channels=16, patch=(1, 2, 2))


def volume_per_step(mode: str, p: int, *, batch: int, tokens: int, out_tokens: int, heads: int, head_dim: int,
                    layers: int, out_channels: int, nbytes: int) -> float:
    """Bytes one rank sends per denoising step (the formula in the module docstring): `tokens` the split
    attention's sequence (S), `out_tokens` the prediction's tokens (S_out)."""
    if mode == "ulysses":
        return layers * 4 * batch * (tokens / p) * heads * head_dim * nbytes * (p - 1) / p
    if mode == "ring":
        return layers * 2 * batch * (tokens / p) * heads * head_dim * nbytes * (p - 1)
    if mode == "cfg":
        return (batch / 2) * out_tokens * out_channels * nbytes
    return 0.0


def wan_video_tokens(height: int, width: int, frames: int, *, vae_spatial: int = 8, vae_temporal: int = 4,
                     patch: tuple[int, int, int] = (1, 2, 2)) -> int:
    """Video tokens of a Wan job: the VAE keeps the first frame and compresses each `vae_temporal` after it into
    one latent frame, `vae_spatial` x `vae_spatial` pixels into one latent pixel; patches of t x h x w latents."""
    latent_frames = (frames - 1) // vae_temporal + 1
    return (latent_frames // patch[0]) * (height // vae_spatial // patch[1]) * (width // vae_spatial // patch[2])


def wan_transformer_flops(*, batch: int, video_tokens: int, text_tokens: int, hidden: int, ffn: int, layers: int,
                          text_dim: int, freq_dim: int, in_channels: int, out_channels: int,
                          patch: tuple[int, int, int], **_) -> int:
    """FLOPs of one WanTransformer3DModel call (text-to-video), 2 per multiply-add, from its layer shapes:
    what torch's FlopCounterMode counts (matmuls, convolutions, attention; not norms or elementwise ops)."""
    s, t, h, kernel = video_tokens, text_tokens, hidden, patch[0] * patch[1] * patch[2]
    embed = 2 * s * in_channels * kernel * h                      # patch embedding (a strided Conv3d)
    embed += 2 * (freq_dim * h + h * h + h * 6 * h)               # time embedding and its 6 modulations
    embed += 2 * t * (text_dim * h + h * h)                       # text projection (2 Linears)
    self_attention = 2 * 4 * s * h * h + 4 * s * s * h            # q, k, v, out; scores and weighted values
    cross_attention = 2 * 2 * s * h * h + 2 * 2 * t * h * h + 4 * s * t * h  # q, out on video; k, v on text
    mlp = 2 * 2 * s * h * ffn
    head = 2 * s * h * out_channels * kernel
    return batch * (embed + layers * (self_attention + cross_attention + mlp) + head)


def worker(out_dir: Path, checkpoint: Path, model: str, mode: str, reps: int, request: dict) -> None:
    """Run under torchrun (or alone for one_process): time the pipeline, count what rank 0 sends."""
    from diffstage import build_pipeline
    from diffstage.distributed import current
    from diffstage.distributed.sequence import TRAFFIC

    overrides = [f"parallel.{k}={v}" for k, v in MODES[mode].items()] + ["reuse.enabled=false"]
    pipe = build_pipeline(JOBS[model][0], model_path=checkpoint, overrides=overrides)
    pipe(**request)  # warm-up
    times, denoise = [], []
    for _ in range(reps):
        TRAFFIC["bytes"] = 0
        start = time.perf_counter()
        out = pipe(**request)
        times.append(time.perf_counter() - start)
        denoise.append(next(s for label, s in out.timings.items() if label.endswith("DenoisingStage")))
    if current().rank == 0:
        import numpy as np

        np.save(out_dir / f"{mode}.npy", out.images)
        (out_dir / f"{mode}.json").write_text(json.dumps({"times": times, "denoise_times": denoise,
                                                          "bytes_per_run": TRAFFIC["bytes"]}))


def error_text(e: Exception) -> str:
    """The exception and where it was raised (file:line, function), for the results."""
    frame = traceback.extract_tb(e.__traceback__)[-1]
    return f"{type(e).__name__}: {e} ({Path(frame.filename).name}:{frame.lineno}, {frame.name})"


def count_all_to_all(world: int) -> dict:
    """Count the bytes this rank sends in Diffusers' Ulysses all-to-alls (torch's functional all_to_all_single,
    which its attention dispatch calls), as diffstage counts its own: all but this rank's own share."""
    from torch.distributed import _functional_collectives as funcol

    sent, original = {"bytes": 0}, funcol.all_to_all_single

    def counted(x, *args, **kwargs):
        sent["bytes"] += x.numel() * x.element_size() * (world - 1) // world
        return original(x, *args, **kwargs)

    funcol.all_to_all_single = counted
    return sent


def diffusers_worker(out_dir: Path, checkpoint: Path, mode: str, reps: int, request: dict) -> None:
    """Diffusers' WanPipeline on the same job, in one process or with its enable_parallelism under torchrun."""
    import numpy as np
    import torch
    import torch.distributed as dist
    from diffusers import ContextParallelConfig, WanPipeline

    pipe = WanPipeline.from_pretrained(checkpoint, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    record, rank, sent = {}, 0, {"bytes": 0}
    if DIFFUSERS_MODES[mode]:
        dist.init_process_group("gloo")
        rank = dist.get_rank()
        config = ContextParallelConfig(**DIFFUSERS_MODES[mode])
        try:
            pipe.transformer.enable_parallelism(config=config)
        except ZeroDivisionError as e:
            # Diffusers 0.42.1 places rank r on device r % torch.accelerator.device_count(), which is 0 on a
            # CPU-only torch; recorded, then retried with the CPU counted as the one device it is
            record["stock_error"] = error_text(e)
            torch.accelerator.device_count = lambda: 1
            pipe.transformer.enable_parallelism(config=config)
            record["shim"] = "torch.accelerator.device_count = lambda: 1"
        sent = count_all_to_all(dist.get_world_size())
    kwargs = {k: v for k, v in request.items() if k != "seed"}
    marks = {}  # denoising: from the first transformer call's start to the last step's end

    def first_call(*_):  # a forward pre-hook: returns None, or its value would replace the inputs
        marks.setdefault("start", time.perf_counter())

    pipe.transformer.register_forward_pre_hook(first_call)
    end_step = lambda *_: (marks.__setitem__("end", time.perf_counter()), {})[1]  # noqa: E731
    call = lambda: pipe(generator=torch.Generator("cpu").manual_seed(request["seed"]),  # noqa: E731
                        callback_on_step_end=end_step, **kwargs).frames
    times, denoise = [], []
    try:
        call()  # warm-up
    except Exception as e:  # noqa: BLE001  recorded: whether Diffusers' own mode runs here is the finding
        record["error"] = error_text(e)
    else:
        for _ in range(reps):
            marks.clear()
            sent["bytes"] = 0
            start = time.perf_counter()
            frames = call()
            times.append(time.perf_counter() - start)
            denoise.append(marks["end"] - marks["start"])
        if DIFFUSERS_MODES[mode]:
            record["all_to_all_bytes_per_run"] = sent["bytes"]
    if rank == 0:
        if times:
            np.save(out_dir / f"{mode}.npy", np.asarray(frames))
        (out_dir / f"{mode}.json").write_text(json.dumps({"times": times, "denoise_times": denoise, **record}))
    if DIFFUSERS_MODES[mode]:
        dist.destroy_process_group()


def threads(mode: str) -> int:
    """Threads per process of `mode` (see ONE_PROCESS)."""
    return os.cpu_count() if mode in ("one_process", "diffusers_one_process") else 1


def run_mode(tmp: Path, checkpoint: Path, model: str, mode: str, reps: int, request: dict) -> dict:
    """One mode in fresh processes (torchrun for 2); its record, as rank 0 wrote it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    me = [str(Path(__file__).resolve()), "--model", model, "--worker", mode, "--tmp", str(tmp),
          "--ckpt", str(checkpoint), "--reps", str(reps), "--request", json.dumps(request)]
    if threads(mode) == 1:
        env["OMP_NUM_THREADS"] = "1"
    if mode in ONE_PROCESS:
        cmd = [sys.executable, *me]
    else:
        cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc-per-node=2", *me]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if r.returncode:
        raise SystemExit(f"{mode} failed (exit {r.returncode}):\n{r.stderr[-4000:]}")
    return json.loads((tmp / f"{mode}.json").read_text())


def measure(checkpoint: Path, model: str, reps: int, request: dict) -> dict:
    import numpy as np

    modes = list(MODES) + (list(DIFFUSERS_MODES) if model == "wan" else [])
    steps = request["num_inference_steps"]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for mode in modes:
            data = run_mode(tmp, checkpoint, model, mode, reps, request)
            times, denoise = data.pop("times"), data.pop("denoise_times")
            results[mode] = {"processes": 1 if mode in ONE_PROCESS else 2, "threads_per_process": threads(mode),
                             "median_s": round(statistics.median(times), 3) if times else None,
                             "denoise_median_s": round(statistics.median(denoise), 3) if denoise else None}
            for key in ("bytes_per_run", "all_to_all_bytes_per_run"):
                if key in data:
                    results[mode]["bytes_sent_per_step"] = data.pop(key) / steps
            results[mode].update(data)  # Diffusers: the error enable_parallelism raised as shipped, the shim
            print(f"{mode}: {results[mode]}", file=sys.stderr)
        for mode, r in results.items():
            base = "diffusers_one_process" if mode.startswith("diffusers") else "one_process"
            if r["median_s"] is None:  # Diffusers' mode did not run here: its error is the result
                continue
            r["speedup_vs_one_process"] = round(results[base]["median_s"] / r["median_s"], 3)
            r["denoise_speedup_vs_one_process"] = round(results[base]["denoise_median_s"] / r["denoise_median_s"], 3)
            if mode in MODES:  # the split's own gain: against one process of one thread
                r["denoise_speedup_vs_one_process_1thread"] = round(
                    results["one_process_1thread"]["denoise_median_s"] / r["denoise_median_s"], 3)
            r["max_abs_diff_vs_one_process"] = float(np.abs(np.load(tmp / f"{mode}.npy")
                                                            - np.load(tmp / f"{base}.npy")).max())
        if results.get("diffusers_one_process", {}).get("median_s") is not None:
            ours, theirs = np.load(tmp / "one_process.npy"), np.load(tmp / "diffusers_one_process.npy")
            results["diffusers_one_process"]["max_abs_diff_vs_diffstage_one_process"] = \
                float(np.abs(ours.reshape(theirs.shape) - theirs).max())
    return results


def bench_dims(model: str, request: dict) -> dict:
    """The measured job's dimensions for volume_per_step (CFG batched in one call: B = 2)."""
    if model == "flux":  # with the bench VAE (8x) and 2x2 patches: 16 x 16 image tokens, joint with the text
        image = (request["height"] // 16) * (request["width"] // 16)
        return dict(batch=2, tokens=request["max_sequence_length"] + image, out_tokens=image, heads=12,
                    head_dim=64, layers=6, out_channels=64, nbytes=4)
    from diffstage.models.wan.tiny import SIZES

    size = SIZES["bench"]
    video = wan_video_tokens(request["height"], request["width"], request["num_frames"])
    return dict(batch=2, tokens=video, out_tokens=video, heads=size["num_attention_heads"],
                head_dim=size["attention_head_dim"], layers=size["num_layers"], out_channels=16 * 2 * 2, nbytes=4)


def layout_rows(one_gpu_s: float, dims: dict, heads: int) -> dict:
    """Projected rows for 2/4/8 GPUs: Ulysses, Ring, and CFG (with Ulysses beyond 2 GPUs); `dims` for
    volume_per_step without the batch, bf16."""
    rows = {}
    for p in (2, 4, 8):
        layouts = {"ulysses": {"ulysses": p}, "ring": {"ring": p}}
        layouts["cfg" if p == 2 else f"cfg2_ulysses{p // 2}"] = {"cfg": 2, "ulysses": p // 2} if p > 2 else {"cfg": 2}
        for name, layout in layouts.items():
            u = layout.get("ulysses", 1)
            assert heads % u == 0, (heads, u)  # a Ulysses degree must divide the heads
            sent = volume_per_step("cfg", 2, batch=2, **dims) if layout.get("cfg") else 0.0
            batch = 1 if layout.get("cfg") else 2  # a CFG rank runs one branch
            if u > 1:
                sent += volume_per_step("ulysses", u, batch=batch, **dims)
            if layout.get("ring", 1) > 1:
                sent += volume_per_step("ring", layout["ring"], batch=batch, **dims)
            row = {"bytes_per_step_per_gpu": round(sent), "compute_s_per_step": round(one_gpu_s / p, 4)}
            for link, bandwidth in LINKS.items():
                comm = sent / bandwidth
                row[f"comm_s_{link}"] = round(comm, 4)
                row[f"speedup_{link}"] = round(one_gpu_s / (one_gpu_s / p + comm), 2)
            rows[f"{p}gpu/{name}"] = row
    return rows


def projection() -> dict:
    """FLUX.1-dev on GPUs (see the module docstring for the assumptions)."""
    params, heads, head_dim, layers, text = 11.9e9, 24, 128, 19 + 38, 512
    out = {}
    for side in (1024, 2048):
        image = (side // 16) ** 2
        s = text + image
        flops = 2 * (2 * params * s + 4 * s * s * heads * head_dim * layers)  # B = 2 (true CFG), per step
        dims = dict(tokens=s, out_tokens=image, heads=heads, head_dim=head_dim, layers=layers, out_channels=64,
                    nbytes=2)
        for key, row in layout_rows(flops / GPU_FLOPS, dims, heads).items():
            out[f"{side}x{side}/{key}"] = row
        out[f"{side}x{side}/1gpu"] = {"compute_s_per_step": round(flops / GPU_FLOPS, 4)}
    return out


def projection_wan() -> dict:
    """Wan2.1-14B on GPUs, 81 frames (see the module docstring for the assumptions)."""
    text, out = 512, {}
    for height, width in ((480, 832), (720, 1280)):
        video = wan_video_tokens(height, width, 81)
        flops = wan_transformer_flops(batch=2, video_tokens=video, text_tokens=text, **WAN_14B)  # per step
        dims = dict(tokens=video, out_tokens=video, heads=WAN_14B["heads"], head_dim=WAN_14B["head_dim"],
                    layers=WAN_14B["layers"], out_channels=WAN_14B["out_channels"] * 4, nbytes=2)
        out[f"{height}x{width}/1gpu"] = {"video_tokens": video, "flops_per_step": flops,
                                         "compute_s_per_step": round(flops / GPU_FLOPS, 4)}
        for key, row in layout_rows(flops / GPU_FLOPS, dims, WAN_14B["heads"]).items():
            out[f"{height}x{width}/{key}"] = row
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=list(JOBS), default="flux")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--ckpt", type=Path, help="the bench checkpoint (default: .cache/bench-flux or bench-wan)")
    p.add_argument("--out", type=Path, help="default: benchmarks/results/bench_parallel.json (FLUX), "
                                            "bench_parallel_wan.json (Wan)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=INT",
                   help="change the request for a quick trial, e.g. height=64 width=64 num_frames=5")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--tmp", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--request", help=argparse.SUPPRESS)
    args = p.parse_args()
    _, request, folder, out_name = JOBS[args.model]
    checkpoint = args.ckpt or ROOT / ".cache" / folder
    if args.worker:
        request = json.loads(args.request)
        if args.worker in DIFFUSERS_MODES:
            return diffusers_worker(args.tmp, checkpoint, args.worker, args.reps, request)
        return worker(args.tmp, checkpoint, args.model, args.worker, args.reps, request)
    request = {**request, **{k: int(v) for k, v in (item.split("=", 1) for item in args.set)}}

    import torch

    from diffstage.hardware import cpu_info

    load_before = os.getloadavg()
    if args.model == "flux":
        from diffstage.models.flux.tiny import build_tiny_flux

        build_tiny_flux(checkpoint, variant="dev", size="bench")
    else:
        from diffstage.models.wan.tiny import build_tiny_wan

        build_tiny_wan(checkpoint, size="bench")
    measured = measure(checkpoint, args.model, args.reps, request)
    for mode, r in measured.items():
        if mode in MODES and mode not in ONE_PROCESS:
            r["formula_bytes_per_step"] = volume_per_step(mode, 2, **bench_dims(args.model, request))
    settings = {"steps": request["num_inference_steps"], "reps": args.reps, "threads_total": 2,
                **{k: v for k, v in request.items() if k != "output_type"}}
    machine = {**cpu_info(), "torch": torch.__version__, "python": platform.python_version(), "device": "cpu",
               "backend": "gloo", "load_average_1_5_15_before": load_before,
               "load_average_1_5_15_after": os.getloadavg()}
    if args.model == "flux":
        report = {"benchmark": "bench-size FLUX, 256x256, 64 text tokens, true CFG, float32: 1 vs 2 processes per mode",
                  "settings": settings, "machine": machine, "measured": measured,
                  "projection_flux1_dev": {"assumptions": {"gpu_flops": GPU_FLOPS, "links_bytes_per_s": LINKS,
                                                           "dtype": "bfloat16", "true_cfg": True, "overlap": "none"},
                                           "rows": projection()}}
    else:
        import diffusers

        machine["diffusers"] = diffusers.__version__
        report = {"benchmark": "bench-size Wan2.1 T2V (Diffusers' WanTransformer3DModel), video, CFG, float32: "
                               "1 vs 2 processes per mode, beside Diffusers' enable_parallelism",
                  "settings": {**settings, "video_tokens": bench_dims("wan", request)["tokens"]},
                  "machine": machine, "measured": measured,
                  "projection_wan2_1_14b": {"assumptions": {"gpu_flops": GPU_FLOPS, "links_bytes_per_s": LINKS,
                                                            "dtype": "bfloat16", "true_cfg": True,
                                                            "overlap": "none", "frames": 81, "text_tokens": 512,
                                                            "transformer": WAN_14B},
                                            "rows": projection_wan()}}
    out = args.out or ROOT / "benchmarks" / "results" / out_name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["measured"], indent=2))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
