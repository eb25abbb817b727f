"""Tiny random batches in the Batch contract of ``carebench.models.base`` (B=4, T=48, F=8, 32x32 images)."""

from __future__ import annotations

import torch

B, T, F, S = 4, 48, 8, 32
TASKS = ("mortality", "phenotype", "los")


def make_batch(task: str, seed: int = 0, has_cxr: tuple[bool, ...] = (True, True, True, False)) -> dict:
    """A batch as the loader produces it; missing images are zeros, as the loader writes them."""
    g = torch.Generator().manual_seed(seed)
    n = len(has_cxr)
    has = torch.tensor(has_cxr)
    cxr = torch.randn(n, 1, S, S, generator=g) * has[:, None, None, None]
    if task == "mortality":
        y = torch.tensor([[1.0], [0.0], [1.0], [0.0]])[:n]
    elif task == "phenotype":
        y = (torch.rand(n, 25, generator=g) > 0.5).float()
    else:
        y = torch.tensor([0, 3, 6, 2])[:n]
    return {
        "ehr": torch.randn(n, T, F, generator=g),
        "ehr_mask": (torch.rand(n, T, F, generator=g) > 0.6).float(),
        "cxr": cxr,
        "has_cxr": has,
        "cxr_hours": torch.rand(n, generator=g) * 48 * has,
        "static": torch.stack(
            [torch.randn(n, generator=g), (torch.rand(n, generator=g) > 0.5).float()], dim=1
        ),
        "y": y,
        "stay_id": torch.arange(30000000, 30000000 + n, dtype=torch.int64),
    }
