"""A classifier of the real digits, to judge whether generated images show the prompted digit."""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from . import data


@lru_cache(maxsize=1)
def digit_classifier():
    """An SVC trained on all real digits, seen through the same 32x32 -> 8x8 path as generated ones."""
    from sklearn.svm import SVC

    images, labels = data.load()
    clf = SVC(gamma=0.001, C=10.0)
    clf.fit(data.images_to_features(images).numpy(), labels.numpy())
    return clf


def classify(images) -> np.ndarray:
    """Predicted digit for each image ([N, H, W, 3] numpy or [N, 3, H, W] tensor, values in [0, 1])."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images).permute(0, 3, 1, 2)
    return digit_classifier().predict(data.images_to_features(images).numpy())


def generate_and_score(pipe, per_digit: int = 10, seed_base: int = 1000, **sampling) -> tuple[float, np.ndarray]:
    """Generate `per_digit` images of each digit (distinct seeds, the pipeline's default sampling
    unless overridden) and return (accuracy, confusion matrix [true, predicted])."""
    confusion = np.zeros((10, 10), dtype=int)
    for digit in range(10):
        for k in range(per_digit):
            image = pipe(data.prompt(digit), seed=seed_base + digit * per_digit + k, output_type="np", **sampling).images
            confusion[digit, classify(image)[0]] += 1
    return float(np.trace(confusion) / confusion.sum()), confusion
