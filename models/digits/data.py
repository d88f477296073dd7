"""The handwritten digits that ship with scikit-learn, as 32x32 images, and the prompts for them.

sklearn.datasets.load_digits: 1,797 8x8 grey images, values 0..16 (16 = ink), from the
UCI "Optical Recognition of Handwritten Digits" data set (CC BY 4.0)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

SIZE = 32
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = ("a handwritten digit {word}", "the number {word}", "a drawing of the digit {word}", "handwritten {digit}")


def prompt(label: int, template: int = 0) -> str:
    return TEMPLATES[template].format(word=WORDS[label], digit=label)


def all_prompts() -> list[str]:
    """Every training prompt, label-major, then the empty (unconditional) prompt last."""
    return [prompt(d, t) for d in range(10) for t in range(len(TEMPLATES))] + [""]


def ink_to_images(ink: torch.Tensor) -> torch.Tensor:
    """[N, 8, 8] ink in [0, 1] -> [N, 3, 32, 32] RGB in [0, 1]: dark ink on white paper."""
    up = F.interpolate(ink[:, None].float(), size=SIZE, mode="bilinear", align_corners=False)
    return (1 - up).clamp(0, 1).repeat(1, 3, 1, 1)


def images_to_features(images: torch.Tensor) -> torch.Tensor:
    """[N, 3, 32, 32] RGB in [0, 1] -> [N, 64] on sklearn's 0..16 ink scale (8x8 averages)."""
    ink = 1 - images.float().mean(dim=1, keepdim=True)
    return (F.avg_pool2d(ink, SIZE // 8) * 16).flatten(1)


def load() -> tuple[torch.Tensor, torch.Tensor]:
    """(images [N, 3, 32, 32] in [0, 1], labels [N])."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    ink = torch.tensor(digits.images / 16.0, dtype=torch.float32)
    return ink_to_images(ink), torch.tensor(digits.target, dtype=torch.long)
