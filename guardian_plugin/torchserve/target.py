"""An attack's view of a model served by TorchServe: every image is one HTTP request.

Inputs are victim-normalised tensors (what attacks generate); each is mapped back to pixels, rounded to
8 bits and sent as a PNG, as a real client would. Responses are TorchServe ImageClassifier JSON
(``{label: probability}``, top-k); classes missing from a top-k answer share the remaining mass equally.
A 403 answer means the client is refused: :class:`QueryRefused` is raised.
"""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence

import numpy as np
import requests
import torch
from PIL import Image

from guardian_plugin.attacks.target import QueryRefused, QueryTarget


def png_bytes(pixels01: torch.Tensor) -> bytes:
    """A (C, H, W) [0, 1] image as PNG bytes (grayscale for C=1, RGB for C=3)."""
    a = (pixels01.detach().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    img = Image.fromarray(a[0]) if a.shape[0] == 1 else Image.fromarray(np.transpose(a, (1, 2, 0)))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def parse_topk(body: str, num_classes: int, labels: Optional[Sequence[str]] = None) -> torch.Tensor:
    """ImageClassifier's ``{label: probability}`` -> a (K,) probability vector."""
    d = json.loads(body)
    if isinstance(d, list):  # some handlers wrap the dict in a list
        d = d[0]
    index = {str(l): i for i, l in enumerate(labels)} if labels is not None else {str(i): i for i in range(num_classes)}
    p = torch.full((num_classes,), float("nan"))
    for k, v in d.items():
        p[index[str(k)]] = float(v)
    missing = torch.isnan(p)
    if missing.any():
        p[missing] = max(0.0, 1.0 - float(p[~missing].sum())) / int(missing.sum())
    return p


def http_client_setup(target, endpoint: str, num_classes: int, mean: Sequence[float], std: Sequence[float],
                      client_id: Optional[str], headers: Optional[Dict[str, str]], timeout_s: float) -> None:
    """The state every HTTP query target keeps: endpoint, the victim's normalisation (to send pixels),
    the identity headers (``X-Client-Id`` when ``client_id`` is given), counters and a session."""
    target.endpoint = endpoint
    target.num_classes = num_classes
    target.mean = torch.tensor(list(mean)).view(1, -1, 1, 1)
    target.std = torch.tensor(list(std)).view(1, -1, 1, 1)
    target.headers = dict(headers or {})
    if client_id is not None:
        target.headers["X-Client-Id"] = client_id
    target.timeout_s = timeout_s
    target.queries = 0
    target.refused_at = None
    target.statuses = {}
    target._session = requests.Session()


class TorchServeTarget(QueryTarget):
    """One client of ``{url}/predictions/{model}``, identified by ``headers`` (e.g. X-Client-Id)."""

    def __init__(self, url: str, model: str, num_classes: int, mean: Sequence[float], std: Sequence[float],
                 client_id: Optional[str] = None, headers: Optional[Dict[str, str]] = None,
                 labels: Optional[Sequence[str]] = None, concurrency: int = 8, timeout_s: float = 60.0):
        http_client_setup(self, f"{url.rstrip('/')}/predictions/{model}", num_classes, mean, std, client_id,
                          headers, timeout_s)
        self.labels = labels
        self._pool = ThreadPoolExecutor(max_workers=concurrency)

    def _post(self, body: bytes):
        return self._session.post(self.endpoint, data=body, headers=self.headers, timeout=self.timeout_s)

    def send(self, bodies: List[bytes]) -> List[requests.Response]:
        """Send raw request bodies concurrently (so the server can batch them)."""
        return list(self._pool.map(self._post, bodies))

    @torch.no_grad()
    def query(self, x: torch.Tensor) -> torch.Tensor:
        pix = (x.detach().cpu().float() * self.std + self.mean).clamp(0, 1)
        responses = self.send([png_bytes(p) for p in pix])
        out = []
        for r in responses:
            self.statuses[r.status_code] = self.statuses.get(r.status_code, 0) + 1
            if r.status_code == 403:
                if self.refused_at is None:
                    self.refused_at = self.queries
                self.queries += 1
                raise QueryRefused(self.headers.get("X-Client-Id", "client"))
            if r.status_code != 200:
                raise RuntimeError(f"{self.endpoint}: HTTP {r.status_code} {r.text[:200]}")
            self.queries += 1
            out.append(parse_topk(r.text, self.num_classes, self.labels))
        return torch.stack(out)

    def close(self):
        self._pool.shutdown(wait=True)
        self._session.close()
