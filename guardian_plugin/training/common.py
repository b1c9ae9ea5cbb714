"""Small shared training utilities: seeding, devices, batching, accuracy."""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(device: str | None) -> torch.device:
    """'auto' -> cuda when present, else cpu; anything else as given (a clear error if unavailable)."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d = torch.device(device)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {device}: CUDA is not available on this machine")
    return d


@torch.no_grad()
def predict(model: torch.nn.Module, x: torch.Tensor, batch: int = 512, device="cpu") -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i:i + batch].to(device)).cpu() for i in range(0, len(x), batch)])


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, device="cpu") -> float:
    return float((predict(model, x, device=device).argmax(1) == y).float().mean())
