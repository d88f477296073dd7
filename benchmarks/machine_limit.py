"""How close a transformer runs to the machine's limit, for the benchmarks.

- `call_flops`: the floating-point operations of one transformer call, counted by PyTorch's FlopCounterMode
  from the shapes of the matmuls and attentions it runs (CPU attention added: PyTorch counts only its GPU
  kernels).
- `peak_matmul_flops`: what one large square matmul reaches on this machine in this run (the practical peak:
  the same MKL/oneDNN kernels the model's Linears use), in float32 and bfloat16.
- `time_shares`: where a transformer call's time goes, from a profile: matmuls, attention, norms, the rest.
"""
from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_flop_count

_CPU_SDPA = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


@register_flop_formula(_CPU_SDPA, get_raw=False)
def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def call_flops(call: Callable[[], object]) -> int:
    """FLOPs of `call()` (run once, under the counter)."""
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        call()
    return int(counter.get_total_flops())


def peak_matmul_flops(dtype: torch.dtype, size: int = 2048, reps: int = 5) -> float:
    """FLOP/s of the fastest of `reps` size x size matmuls in `dtype` (after one warm-up)."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best


# op name fragments -> category (first match wins); the rest is "other" (elementwise, copies, launch gaps)
CATEGORIES = (("attention", ("scaled_dot_product", "attention", "softmax", "baddbmm", "bmm")),
              ("matmul", ("addmm", "aten::mm", "matmul", "linear")),
              ("norm", ("layer_norm", "rms_norm", "group_norm", "native_layer_norm")))


def time_shares(call: Callable[[], object]) -> dict[str, float]:
    """Shares of one call's wall time by category: leaf ops' self CPU time, and what no op accounts for."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        call()  # warm
        start = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            call()
        wall = time.perf_counter() - start
    totals = {name: 0.0 for name, _ in CATEGORIES} | {"other ops": 0.0}
    for event in prof.key_averages():
        seconds = event.self_cpu_time_total / 1e6
        category = next((name for name, keys in CATEGORIES if any(k in event.key for k in keys)), "other ops")
        totals[category] += seconds
    profiled = sum(totals.values())
    shares = {name: round(seconds / profiled, 4) for name, seconds in totals.items()} if profiled else {}
    shares["profiled_s"] = round(profiled, 4)
    shares["wall_s_under_profiler"] = round(wall, 4)
    return shares
