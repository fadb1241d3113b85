"""scikit-learn's bundled handwritten digits as upsampled, standardised image tensors.

The data ships with scikit-learn (nothing is downloaded). The train/validation
split is a fixed permutation (seed 0), the same for every run and every rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Digits:
    train_x: torch.Tensor  # (N, 1, S, S) float32, standardised with the training statistics
    train_y: torch.Tensor  # (N,) int64
    val_x: torch.Tensor
    val_y: torch.Tensor


@lru_cache(maxsize=4)
def load_digits(image_size: int = 16, val_fraction: float = 0.2) -> Digits:
    """The 1797 digits, upsampled from 8x8 to `image_size`, split into train and validation."""
    from sklearn.datasets import load_digits as sklearn_digits

    if image_size < 8:
        raise ValueError(f"data.image_size={image_size} must be >= 8")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"data.val_fraction={val_fraction} must be in (0, 1)")
    raw = sklearn_digits()
    x = torch.tensor(raw.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    y = torch.tensor(raw.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    n_val = max(1, round(len(y) * val_fraction))
    val, train = order[:n_val], order[n_val:]
    mean, std = x[train].mean(), x[train].std()
    x = (x - mean) / std
    return Digits(x[train], y[train], x[val], y[val])


def random_batch(
    data: Digits, batch_size: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch_size` training images and labels drawn with replacement using `gen`."""
    idx = torch.randint(0, len(data.train_y), (batch_size,), generator=gen)
    return data.train_x[idx], data.train_y[idx]
