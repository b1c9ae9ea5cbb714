"""Clients of the example BentoML service: query images as a real client sends them, and the HTTP
QueryTarget (guardian_plugin.bento.BentoTarget) set up for it, so the attack harness can run an attack
against the served (protected) model.

    from bento.client import BentoTarget
    target = BentoTarget("http://127.0.0.1:3000", client_id="attacker")
    probs = target.query(x)        # x: victim-normalised (B, 1, 28, 28); raises QueryRefused on 403
"""

from __future__ import annotations

import io
import typing as t

import numpy as np
import torch
from PIL import Image

MEAN, STD = 0.1307, 0.3081


def png(a: np.ndarray) -> bytes:
    """uint8 (H, W) -> PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(a, dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def real_digits(n: int, offset: int = 0) -> t.Tuple[t.List[np.ndarray], t.List[int]]:
    """(uint8 28x28 images, labels) of the held-out MNIST test digits the victim never trained on."""
    from guardian_plugin.training.data import mnist_splits

    x, y = mnist_splits()["test"]
    return [x[i, 0] for i in range(offset, offset + n)], [int(v) for v in y[offset:offset + n]]


def synthetic_digits(n: int, seed: int = 0) -> t.List[np.ndarray]:
    """uint8 28x28 images from a DFME generator (GeneratorA, as data-free attacks start), mapped from
    the victim's normalised space to 8-bit pixels as an attacker's HTTP client must send them."""
    from guardian_plugin.nets import GeneratorA

    torch.manual_seed(seed)
    gen = GeneratorA(nz=256, channels=1, size=28).train()
    with torch.no_grad():
        x = gen(torch.randn(max(n, 2), 256))[:n]
    return list(to_uint8(x))


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Victim-normalised (B, 1, H, W) -> uint8 (B, H, W) pixels."""
    pix = (x.detach().float() * STD + MEAN).clamp(0, 1)
    return (pix * 255).round().to(torch.uint8)[:, 0].cpu().numpy()


def files(images: t.Sequence[np.ndarray], field: str = "images") -> list:
    return [(field, (f"{i}.png", png(a), "image/png")) for i, a in enumerate(images)]


def BentoTarget(url: str, client_id: str = "attacker", api: str = "classify_batch", **kw):
    """guardian_plugin.bento.BentoTarget for the example service (MNIST normalisation, batch API)."""
    from guardian_plugin.bento import BentoTarget as Target

    return Target(url, api=api, num_classes=10, mean=(MEAN,), std=(STD,), client_id=client_id, **kw)
