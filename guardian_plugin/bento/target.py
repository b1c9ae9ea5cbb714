"""An attack's query target for a served BentoML classifier. ``guardian_plugin.bento.BentoTarget`` (the
QueryTarget subclass) is built from it on first use, so serving never imports this module or the attack
package."""

from __future__ import annotations

import typing as t

import torch


class _BentoTarget:
    """An attack's view of a served BentoML classifier (guardian_plugin.attacks.target.QueryTarget):
    one client (``X-Client-Id``), every image one query.

    Inputs are victim-normalised tensors; each image is mapped back to pixels with ``mean``/``std``,
    rounded to 8 bits and sent as a PNG, as a real client would. ``batch_field`` set: one multipart
    request per query batch to a batchable API taking a list of images (answer ``(B, K)``); else one
    request per image to ``field`` (answer ``(K,)``), sent concurrently. A 403 raises QueryRefused.
    """

    def __init__(self, url: str, api: str = "classify_batch", num_classes: int = 10, mean=(0.1307,), std=(0.3081,),
                 client_id: t.Optional[str] = "attacker", headers: t.Optional[dict] = None,
                 batch_field: t.Optional[str] = "images", field: str = "image", concurrency: int = 8,
                 timeout_s: float = 120.0):
        from guardian_plugin.torchserve.target import http_client_setup

        http_client_setup(self, url.rstrip("/") + "/" + api.lstrip("/"), num_classes, mean, std, client_id, headers,
                          timeout_s)
        self.batch_field, self.field = batch_field, field
        self.concurrency = concurrency

    def _refused(self, n: int):
        from guardian_plugin.attacks.target import QueryRefused

        if self.refused_at is None:
            self.refused_at = self.queries
        raise QueryRefused(self.headers.get("X-Client-Id", "client"))

    def _count(self, r):
        self.statuses[r.status_code] = self.statuses.get(r.status_code, 0) + 1

    @torch.no_grad()
    def query(self, x: torch.Tensor) -> torch.Tensor:
        pix = (x.detach().cpu().float() * self.std + self.mean).clamp(0, 1)
        from guardian_plugin.torchserve.target import png_bytes

        pngs = [png_bytes(p) for p in pix]
        if self.batch_field:
            r = self._session.post(self.endpoint, headers=self.headers, timeout=self.timeout_s,
                                   files=[(self.batch_field, (f"{i}.png", b, "image/png")) for i, b in enumerate(pngs)])
            self._count(r)
            if r.status_code == 403:
                self._refused(len(pngs))
            if r.status_code != 200:
                raise RuntimeError(f"{self.endpoint}: HTTP {r.status_code} {r.text[:200]}")
            self.queries += len(pngs)
            return torch.tensor(r.json(), dtype=torch.float32).view(len(pngs), self.num_classes)
        from concurrent.futures import ThreadPoolExecutor

        def post(b):
            return self._session.post(self.endpoint, headers=self.headers, timeout=self.timeout_s,
                                      files={self.field: ("x.png", b, "image/png")})

        with ThreadPoolExecutor(self.concurrency) as ex:
            resps = list(ex.map(post, pngs))
        out = []
        for r in resps:
            self._count(r)
            if r.status_code == 403:
                self._refused(1)
            if r.status_code != 200:
                raise RuntimeError(f"{self.endpoint}: HTTP {r.status_code} {r.text[:200]}")
            self.queries += 1
            out.append(torch.tensor(r.json(), dtype=torch.float32).view(self.num_classes))
        return torch.stack(out)

    def close(self):
        self._session.close()
