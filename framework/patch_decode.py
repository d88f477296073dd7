"""Patch-parallel decoding (runtime.vae_parallel): the latent is cut into bands of rows (height), each band is
decoded with a halo of its neighbours' rows on each side, the halo's pixels are cropped, and the bands are
put back together. Under torchrun each rank decodes one band and the ranks all-gather the frames, so a rank
holds one band's decoder activations, which dominate the memory of a high-resolution decode.

Every rank holds the whole latent already (the denoising stage ends with it on every rank), so the halos are
read locally: nothing but the decoded pixels crosses ranks. Bands are not bit-identical to a whole decode
where the VAE's decoder mixes a whole frame (an attention block, a group norm): the halo bounds the error
elsewhere. One process decoding the same bands gives the ranks' frames exactly (decode_in_bands)."""
from __future__ import annotations

from typing import Callable

import torch

from .distributed.state import current
from .errors import DiffstageError

# Latent rows on each side of a band (runtime.vae_halo's default): a small video VAE's decoder reaches about 11
# latent rows (its convolutions before and between upsamplings), a full-size one about 17; past that, only
# whole-frame layers (attention) make a band differ, and a wider halo narrows that too.
DEFAULT_HALO = 8


def band_bounds(rows: int, bands: int) -> list[tuple[int, int]]:
    """`rows` split into `bands` runs as even as can be (the first ones a row longer when it does not divide)."""
    if bands > rows:
        raise DiffstageError(f"runtime.vae_parallel=true: {bands} ranks cannot each decode a band of a latent "
                             f"{rows} rows high; run fewer processes or a larger height")
    base, extra = divmod(rows, bands)
    cuts = [0]
    for i in range(bands):
        cuts.append(cuts[-1] + base + (i < extra))
    return list(zip(cuts, cuts[1:]))


def decode_band(decode: Callable, latents: torch.Tensor, lo: int, hi: int, halo: int = DEFAULT_HALO) -> torch.Tensor:
    """The pixels of latent rows [lo, hi): decoded with up to `halo` rows more on each side, then cropped."""
    rows = latents.shape[-2]
    start, stop = max(0, lo - halo), min(rows, hi + halo)
    out = decode(latents[..., start:stop, :])
    scale, rest = divmod(out.shape[-2], stop - start)
    if rest:
        raise DiffstageError(f"runtime.vae_parallel=true: the VAE decoded {stop - start} latent rows into "
                             f"{out.shape[-2]} pixel rows, not a whole number per row; it cannot decode in bands")
    return out[..., (lo - start) * scale:(hi - start) * scale, :]


def decode_in_bands(decode: Callable, latents: torch.Tensor, bands: int, halo: int = DEFAULT_HALO) -> torch.Tensor:
    """The whole frames, decoded one band after another in this process (what `bands` ranks give together)."""
    parts = [decode_band(decode, latents, lo, hi, halo) for lo, hi in band_bounds(latents.shape[-2], bands)]
    return torch.cat(parts, dim=-2)


def decode_across_ranks(decode: Callable, latents: torch.Tensor, halo: int = DEFAULT_HALO) -> torch.Tensor:
    """Rank r of the run decodes band r; every rank returns the whole frames. One process: a whole decode."""
    state = current()
    if state.world_size == 1:
        return decode(latents)
    import torch.distributed as dist

    bounds = band_bounds(latents.shape[-2], state.world_size)
    lo, hi = bounds[state.rank]
    mine = decode_band(decode, latents, lo, hi, halo)
    scale = mine.shape[-2] // (hi - lo)  # the same on every rank: one VAE
    # all_gather takes tensors of one shape: pad each band to the tallest, crop after
    tallest = max(b - a for a, b in bounds) * scale
    padded = mine.new_zeros(*mine.shape[:-2], tallest, mine.shape[-1])
    padded[..., :mine.shape[-2], :] = mine
    parts = [torch.empty_like(padded) for _ in bounds]
    dist.all_gather(parts, padded)
    return torch.cat([p[..., :(b - a) * scale, :] for p, (a, b) in zip(parts, bounds)], dim=-2)
