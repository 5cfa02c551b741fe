"""Cutout (DeVries & Taylor, 2017), the DARTS evaluation's training augmentation (16 px on CIFAR).

One square of side ``length`` per image, centred at a uniformly drawn pixel and clipped at the
border, is set to zero. Randomness comes from the caller's generator only.
"""

from __future__ import annotations

import torch


def cutout(x: torch.Tensor, length: int, generator: torch.Generator) -> torch.Tensor:
    """A copy of the batch ``x`` (N, C, H, W) with one ``length`` x ``length`` hole per image."""
    n, _, h, w = x.shape
    ys = torch.randint(0, h, (n,), generator=generator)
    xs = torch.randint(0, w, (n,), generator=generator)
    rows = torch.arange(h).view(1, h, 1)
    cols = torch.arange(w).view(1, 1, w)
    half = length // 2
    inside_y = (rows >= (ys - half).clamp(min=0).view(n, 1, 1)) & (
        rows < (ys + half).clamp(max=h).view(n, 1, 1)
    )
    inside_x = (cols >= (xs - half).clamp(min=0).view(n, 1, 1)) & (
        cols < (xs + half).clamp(max=w).view(n, 1, 1)
    )
    mask = ~(inside_y & inside_x)
    return x * mask.unsqueeze(1).to(device=x.device, dtype=x.dtype)
