"""What the machine runs natively: the facts behind the runtime's `auto` choices and the benchmarks' records."""
from __future__ import annotations

import platform
from functools import lru_cache
from pathlib import Path

import torch

from .environment import env_choice

# CPU flags that decide float32 vs bfloat16 matmul speed.
SPEED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


@lru_cache(maxsize=1)
def cpu_info() -> dict:
    """{"cpu": model name, "flags": the SPEED_FLAGS it has}, from /proc/cpuinfo (Linux); elsewhere the
    platform's processor name and no flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        name = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
        flags = set(next(line.split(":", 1)[1].split() for line in lines if line.startswith("flags")))
    except (OSError, StopIteration):
        return {"cpu": platform.processor() or platform.machine(), "flags": []}
    return {"cpu": name, "flags": [f for f in SPEED_FLAGS if f in flags]}


def native_bf16(device: torch.device) -> tuple[bool, str]:
    """(whether bfloat16 matmuls run natively on `device`, the reason in words).

    CPU: the AVX512-BF16 or AMX-BF16 instructions (/proc/cpuinfo flags); without them PyTorch emulates
    bf16 matmuls, at about half the float32 speed. CUDA: compute capability 8.0 (Ampere) or newer.
    DIFFSTAGE_NATIVE_BF16=0 or 1 overrides the detection (the tests pin it to 0)."""
    forced = env_choice("DIFFSTAGE_NATIVE_BF16", ("0", "1"), "1 says bfloat16 runs natively, 0 says it does not")
    if forced is not None:
        return forced == "1", f"DIFFSTAGE_NATIVE_BF16={forced}"
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        name = torch.cuda.get_device_name(device)
        return major >= 8, f"{name} has compute capability {major}.{minor} ({'>=' if major >= 8 else '<'} 8.0)"
    if device.type == "cpu":
        info = cpu_info()
        native = [f for f in ("avx512_bf16", "amx_bf16") if f in info["flags"]]
        if native:
            return True, f"{info['cpu']} has {' and '.join(native)}"
        return False, f"{info['cpu']} has no avx512_bf16 or amx_bf16 (bf16 matmuls would be emulated)"
    return False, f"no bf16 detection for device type {device.type}"


# Below this many Linear parameters a transformer's step is dominated by small ops and Python, not matmuls:
# bf16 matmuls and compiled blocks gain little there (a model of under a million), while a compile costs
# tens of seconds. See README "Runtime choices".
LARGE_MODEL_LINEAR_PARAMS = 10_000_000
# `compile: auto` compiles when the run will make at least this many images. Measured (bench_flux, 2-core
# CPUs, an 80M-Linear-parameter transformer at 256x256): compiling the blocks costs 12-16 s on the first image and
# saves 0.035-0.054 s on each later one, so it pays from about 300 images.
COMPILE_MIN_IMAGES = 300


def auto_matmul_dtype(dtype: torch.dtype, device: torch.device, linear_params: int) -> tuple[torch.dtype | None, str]:
    """`runtime.matmul_dtype=auto`: (bfloat16 or None for the activations' dtype, why)."""
    if dtype != torch.float32:
        return None, f"the activations are {str(dtype)[6:]} already"
    native, why = native_bf16(device)
    if not native:
        return None, why
    if linear_params < LARGE_MODEL_LINEAR_PARAMS:
        return None, f"{why}, but {linear_params / 1e6:.1f}M Linear parameters are too few for bf16 matmuls to pay"
    return torch.bfloat16, why


def auto_compile(planned_images: int | None, linear_params: int) -> tuple[bool, str]:
    """`runtime.compile=auto`: (compile the repeated blocks?, why). planned_images: the images this run will
    make (a sweep's job count); None: unknown, so no compile (it must pay, not hope to)."""
    if linear_params < LARGE_MODEL_LINEAR_PARAMS:
        return False, f"{linear_params / 1e6:.1f}M Linear parameters: compiling would not pay"
    if planned_images is None:
        return False, "the number of images this run makes is unknown (runtime.compile=true to compile anyway)"
    if planned_images < COMPILE_MIN_IMAGES:
        return False, (f"this run makes {planned_images} image{'s' if planned_images > 1 else ''} (compiling pays "
                       f"from about {COMPILE_MIN_IMAGES}; runtime.compile=true to compile anyway)")
    return True, f"this run makes {planned_images} images"
