"""How a VAE decodes, as the run config asks: whole (the default), with the VAE's own tiling
(`runtime.vae_tiling`, tiles of `runtime.vae_tile_size` pixels), or one band of latent rows per rank
(`runtime.vae_parallel`, each band read with `runtime.vae_halo` rows more on each side; see
patch_decode.py). The options are checked with the run config, and against the
loaded VAE when the pipeline is built, so a VAE without tiling fails before any step runs."""
from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

from .errors import DiffstageError, shown
from .patch_decode import DEFAULT_HALO

# Diffusers' video VAEs take their tile edge and the step between tiles as these arguments of enable_tiling()
TILE_ARGS = ("tile_sample_min_height", "tile_sample_min_width", "tile_sample_stride_height", "tile_sample_stride_width")


@dataclass(frozen=True)
class DecodeOptions:
    tiling: bool = False
    tile_size: int | None = None  # pixels; None: the VAE's own default tiles
    parallel: bool = False
    halo: int = DEFAULT_HALO  # latent rows read on each side of a band


def decode_option_problems(runtime: dict[str, Any]) -> list[str]:
    """The runtime.vae_* keys' problems (the run config check lists them with the others)."""
    problems = [f"runtime.{key} must be true or false, got {shown(runtime[key])} ({type(runtime[key]).__name__})"
                for key in ("vae_tiling", "vae_parallel") if key in runtime and not isinstance(runtime[key], bool)]
    size = runtime.get("vae_tile_size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        problems.append(f"runtime.vae_tile_size must be a tile edge in pixels (a positive integer) or null for the "
                        f"VAE's own tiles, got {shown(size)}")
    halo = runtime.get("vae_halo", 0)
    if isinstance(halo, bool) or not isinstance(halo, int) or halo < 0:
        problems.append(f"runtime.vae_halo must be a number of latent rows (an integer >= 0), got {shown(halo)}")
    return problems


def decode_options(runtime: dict[str, Any]) -> DecodeOptions:
    problems = decode_option_problems(runtime)
    if problems:
        raise DiffstageError("invalid run config:\n" + "\n".join(f"  - {p}" for p in problems))
    return DecodeOptions(runtime.get("vae_tiling", False), runtime.get("vae_tile_size"),
                         runtime.get("vae_parallel", False), runtime.get("vae_halo", DecodeOptions.halo))


def tiling_args(vae, tile_size: int | None) -> dict[str, int]:
    """enable_tiling()'s arguments for tiles of `tile_size` pixels (a quarter of each tile overlaps the next,
    in whole latent pixels); checks that this VAE has tiling and takes a tile size."""
    name = type(vae).__name__
    if not callable(getattr(vae, "enable_tiling", None)) or not hasattr(vae, "use_tiling"):
        raise DiffstageError(f"runtime.vae_tiling=true: the VAE ({name}) has no tiling (no enable_tiling()); "
                             "use runtime.vae_tiling=false, or runtime.vae_parallel=true under torchrun")
    if tile_size is None:
        return {}
    if not set(TILE_ARGS) <= set(inspect.signature(vae.enable_tiling).parameters):
        raise DiffstageError(f"runtime.vae_tile_size={tile_size}: {name}.enable_tiling() takes no tile size; "
                             "use runtime.vae_tile_size=null (the VAE's own tiles)")
    ratio = int(getattr(vae, "spatial_compression_ratio", 1) or 1)  # pixels per latent pixel
    if tile_size % ratio or tile_size < 2 * ratio:
        raise DiffstageError(f"runtime.vae_tile_size={tile_size}: {name} decodes {ratio}x{ratio} pixels per latent "
                             f"pixel; give a multiple of {ratio} of at least {2 * ratio}")
    stride = max(ratio, tile_size * 3 // 4 // ratio * ratio)
    return dict(zip(TILE_ARGS, (tile_size, tile_size, stride, stride)))


@contextmanager
def vae_tiling(vae, tile_size: int | None) -> Iterator[None]:
    """The VAE's own tiling for one decode, and its earlier tiling settings back afterwards: the VAE may be shared
    with another pipeline (the session's module cache), which must decode as it asked. Hold vae_lock around it."""
    args = tiling_args(vae, tile_size)
    saved = {k: v for k, v in vars(vae).items() if k == "use_tiling" or k.startswith("tile_")}
    try:
        vae.enable_tiling(**args)
        yield
    finally:
        vars(vae).update(saved)


def attach_decode_options(stages: list, runtime: dict[str, Any], model: str) -> None:
    """Give the runtime.vae_* options to the stages that decode with a VAE (set_decode_options), which check
    them against their VAE now."""
    options = decode_options(runtime)
    if not options.tiling and not options.parallel:
        return
    takers = [s for s in stages if hasattr(s, "set_decode_options")]
    if not takers:
        asked = " ".join(f"runtime.{k}=true" for k in ("vae_tiling", "vae_parallel") if runtime.get(k))
        raise DiffstageError(f"{asked}: model '{model}' has no stage that decodes with a VAE (DecodingStage does); "
                             "leave the runtime.vae_* options at their defaults")
    for stage in takers:
        stage.set_decode_options(options)
