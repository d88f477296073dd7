"""Image similarity for judging approximations (step caches, lower precision) against an exact run."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _as_batch(images) -> torch.Tensor:
    """[N, H, W, C] numpy (as output_type='np' gives) or [N, C, H, W] tensor, in [0, 1] -> [N, C, H, W] float64."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images).permute(0, 3, 1, 2)
    return images.double()


def psnr(images, reference) -> np.ndarray:
    """Peak signal-to-noise ratio in dB of each image against its reference (values in [0, 1]);
    identical images give inf."""
    a, b = _as_batch(images), _as_batch(reference)
    mse = ((a - b) ** 2).flatten(1).mean(1)
    with np.errstate(divide="ignore"):
        return (10 * np.log10(1.0 / mse.numpy())).astype(np.float64)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(images, reference) -> np.ndarray:
    """Structural similarity of each image against its reference (Wang et al. 2004: 11x11 Gaussian
    window, sigma 1.5, K1 0.01, K2 0.03, data range 1), averaged over pixels and channels."""
    a, b = _as_batch(images), _as_batch(reference)
    channels = a.shape[1]
    size = min(11, a.shape[-1], a.shape[-2])
    window = _gaussian_window(size).expand(channels, 1, size, size)

    def blur(x):
        return F.conv2d(x, window, groups=channels)

    c1, c2 = 0.01 ** 2, 0.03 ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a ** 2
    var_b = blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    value = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return value.flatten(1).mean(1).numpy()
