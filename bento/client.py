"""Clients of the example BentoML service: query images as a real client sends them, and an HTTP
QueryTarget so the attack harness can run an attack against a served (protected) BentoML model.

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

from guardian_plugin.attacks.target import QueryRefused, QueryTarget

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


class BentoTarget(QueryTarget):
    """The served model behind HTTP, as one client (``X-Client-Id``): every row is one query.

    Each batch goes to the batchable API in one request (rows are 8-bit PNGs, as a real client sends).
    A 403 from the guard raises QueryRefused; the target remembers after how many queries.
    """

    def __init__(self, url: str, client_id: str = "attacker", api: str = "classify_batch", num_classes: int = 10,
                 timeout: float = 120.0, session=None):
        import requests

        self.url = url.rstrip("/") + "/" + api.lstrip("/")
        self.client_id = client_id
        self.num_classes = num_classes
        self.timeout = timeout
        self.session = session or requests.Session()
        self.queries = 0
        self.refused_at: t.Optional[int] = None

    def query(self, x: torch.Tensor) -> torch.Tensor:
        imgs = to_uint8(x)
        r = self.session.post(self.url, files=files(imgs), headers={"X-Client-Id": self.client_id},
                              timeout=self.timeout)
        if r.status_code == 403:
            if self.refused_at is None:
                self.refused_at = self.queries
            raise QueryRefused(self.client_id)
        r.raise_for_status()
        self.queries += len(imgs)
        return torch.tensor(r.json(), dtype=torch.float32)
