"""Peak memory of a run with runtime.offload=model (the CPU's low-memory mode) against the default.

    python benchmarks/bench_memory.py          # writes benchmarks/results/bench_memory.json

Cases: the embedded `digits` model (32x32), the "bench" random-weight FLUX.1 [dev] checkpoint (see
benchmarks/bench_flux.py; built once into a temporary directory) and a copy of it whose T5 encoder holds FLUX.1-dev's
share of the weights (make_large_t5), each built and run once in a fresh process per setting (default,
offload=model). A process reports its peak RSS: resource.getrusage's ru_maxrss, and VmHWM from
/proc/self/status (ru_maxrss carries the parent's peak over fork + exec; this parent imports neither torch nor
diffstage, so the two agree). The images of the two settings must be identical. Float32 throughout
(runtime.matmul_dtype=null, runtime.compile=false), so that `auto` choices do not differ between machines."""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FOX = "a photo of a red fox in the snow"
PROMPT = {"digits": "a handwritten digit seven", "flux_bench": FOX, "flux_bench_large_t5": FOX}
CHECKPOINT = {"flux_bench": "bench-flux", "flux_bench_large_t5": "bench-flux-large-t5"}
T5_SHARE = 0.4  # FLUX.1-dev: T5-XXL's encoder has 4.76B parameters, its transformer 11.9B
SETTINGS = {"default": [], "offload_model": ["runtime.offload=model"]}
F32 = ["runtime.matmul_dtype=null", "runtime.compile=false"]


def child(args) -> None:
    """One case in this (fresh) process: build, run once, save the image, print what it measured as JSON."""
    import resource

    import torch

    from diffstage import build_pipeline
    from diffstage.hardware import cpu_info

    start = time.perf_counter()
    overrides = [*F32, *SETTINGS[args.setting]]
    if args.case == "digits":
        pipe = build_pipeline("digits", overrides=overrides)
        request = dict(num_inference_steps=args.steps)
    else:
        pipe = build_pipeline("flux", model_path=args.ckpt / CHECKPOINT[args.case], overrides=overrides)
        request = dict(num_inference_steps=args.steps, height=args.size, width=args.size, max_sequence_length=64)
    built = time.perf_counter()
    image = pipe(PROMPT[args.case], seed=0, output_type="np", **request).images
    np.save(args.image, np.asarray(image))
    status = Path("/proc/self/status").read_text()
    hwm_kib = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))
    print(json.dumps({"ru_maxrss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                      "vmhwm_mib": round(hwm_kib / 1024, 1), "build_s": round(built - start, 2),
                      "run_s": round(time.perf_counter() - built, 2),
                      "machine": {**cpu_info(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                                  "python": platform.python_version(), "device": "cpu"}}))


def make_large_t5(ckpt: Path) -> None:
    """Replace the checkpoint's T5 encoder by one as wide (64) but with a feed-forward large enough to hold
    T5_SHARE of the transformer's weights, as in FLUX.1-dev (random weights; only the bytes matter here)."""
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    transformer = sum(f.stat().st_size for f in (ckpt / "transformer").glob("*.safetensors"))
    layers = 8
    d_ff = int(T5_SHARE * transformer / 4 / (3 * 64 * layers))  # gated-gelu: wi_0, wi_1 and wo per layer
    tokenizer = T5TokenizerFast.from_pretrained(ckpt / "tokenizer_2")
    old = T5Config.from_pretrained(ckpt / "text_encoder_2")
    config = T5Config(vocab_size=old.vocab_size, d_model=old.d_model, d_kv=old.d_kv, d_ff=d_ff, num_layers=layers,
                      num_heads=old.num_heads, relative_attention_num_buckets=old.relative_attention_num_buckets,
                      feed_forward_proj=old.feed_forward_proj, is_encoder_decoder=False, pad_token_id=0,
                      eos_token_id=1, decoder_start_token_id=0)
    assert len(tokenizer) <= config.vocab_size
    T5EncoderModel(config).save_pretrained(ckpt / "text_encoder_2", safe_serialization=True)


def build_checkpoints(tmp: Path) -> Path:
    """The bench FLUX checkpoint, and a copy of it with a large T5 encoder, under `tmp`; returns `tmp`."""
    import shutil

    subprocess.run([sys.executable, "-c", "import sys; from diffstage.models.flux.tiny import build_tiny_flux; "
                    "build_tiny_flux(sys.argv[1], variant='dev', size='bench')", str(tmp / CHECKPOINT["flux_bench"])],
                   check=True)
    large = tmp / CHECKPOINT["flux_bench_large_t5"]
    shutil.copytree(tmp / CHECKPOINT["flux_bench"], large)
    subprocess.run([sys.executable, __file__, "--make-large-t5", str(large)], check=True)
    return tmp


def run_case(case: str, setting: str, args, image: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", case, "--setting", setting, "--image", str(image),
           "--steps", str(args.steps), "--size", str(args.size), "--ckpt", str(args.ckpt)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=256, help="the FLUX case's image height and width")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_memory.json")
    parser.add_argument("--ckpt", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child", choices=list(PROMPT), help=argparse.SUPPRESS)
    parser.add_argument("--setting", choices=list(SETTINGS), help=argparse.SUPPRESS)
    parser.add_argument("--image", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--make-large-t5", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.make_large_t5:
        return make_large_t5(args.make_large_t5)
    if args.child:
        args.case = args.child
        return child(args)

    with tempfile.TemporaryDirectory() as tmp:
        args.ckpt = build_checkpoints(Path(tmp))
        results, machine = {}, None
        for case in PROMPT:
            measured = {}
            for setting in SETTINGS:
                measured[setting] = run_case(case, setting, args, Path(tmp) / f"{case}-{setting}.npy")
                machine = measured[setting].pop("machine")
                print(f"{case} {setting}: {measured[setting]}", file=sys.stderr)
            images = [np.load(Path(tmp) / f"{case}-{s}.npy") for s in SETTINGS]
            diff = float(np.abs(images[0] - images[1]).max())
            if diff != 0.0:
                raise SystemExit(f"{case}: offload=model's image differs from the default's (max abs diff {diff})")
            base, off = measured["default"]["ru_maxrss_mib"], measured["offload_model"]["ru_maxrss_mib"]
            results[case] = {**measured, "peak_rss_ratio_offload_vs_default": round(off / base, 3),
                             "peak_rss_saved_mib": round(base - off, 1), "images_max_abs_diff": diff}
    report = {
        "benchmark": "peak RSS of one run, default vs runtime.offload=model (CPU low-memory mode), fresh process each",
        "settings": {"steps": args.steps, "flux_bench_size": args.size, "digits_size": 32, "large_t5_share_of_transformer": T5_SHARE, "seed": 0,
                     "prompts": PROMPT, "overrides": {s: [*F32, *o] for s, o in SETTINGS.items()}},
        "machine": machine,
        "results": results,
        "notes": "ru_maxrss_mib and vmhwm_mib: the process's peak resident memory (libraries, modules, activations, "
                 "file pages it mapped); build_s: build_pipeline; run_s: the one run (offload=model loads the "
                 "modules there). The FLUX 'bench' checkpoint's transformer holds 99% of its weights (its text "
                 "encoders are 64 wide), so little is left to release; flux_bench_large_t5 is the same checkpoint "
                 "with a T5 encoder holding 40% of the transformer's bytes, FLUX.1-dev's proportion (T5-XXL 4.76B "
                 "parameters, transformer 11.9B), where offload releases the encoder before the transformer loads.",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for case, r in results.items():
        print(f"{case:10s} default {r['default']['ru_maxrss_mib']} MiB, offload=model "
              f"{r['offload_model']['ru_maxrss_mib']} MiB (x{r['peak_rss_ratio_offload_vs_default']})")
    print(args.out)


if __name__ == "__main__":
    main()
