"""Query targets: what an attack talks to. Every image sent is one query, counted by the target.

- :class:`InProcessTarget`  victim (+ optional Guardian) in this process; fast enough for full budgets.
- :class:`EvalTarget`       the evaluation harness's: InProcessTarget with admission through
  ``Guardian.admit_clients``, a response policy on every row, flags, id rotation and query recording.
- :class:`TorchServeTarget` a model served by TorchServe, one HTTP request per image (PNG bodies).
- :class:`BentoTarget`      a classifier served by BentoML, one multipart request per batch (or per image).
  ``guardian_plugin.bento.BentoTarget`` is this class (built on first use; serving never imports it).

Inputs are victim-normalised tensors (what the victim's own preprocessing would produce), the form
data-free attacks generate. A refused client gets no answer: :class:`QueryRefused` is raised and the
attack trains on what it already has.
"""

from __future__ import annotations

import io
import json
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from guardian_plugin.responses import Admission


class QueryRefused(Exception):
    """The target refused this client; no answer was given for the batch. ``status``: the HTTP status
    (or its in-process equivalent): 403 refused or blocked, 429 quota used up."""

    def __init__(self, *args, status: int = 403, retry_after: Optional[int] = None):
        super().__init__(*args)
        self.status = status
        self.retry_after = retry_after


class QueryTarget(ABC):
    num_classes: int
    queries: int = 0  # images answered or refused, as counted by the target

    @abstractmethod
    def query(self, x: torch.Tensor) -> torch.Tensor:
        """Probabilities (B, K) for a batch of victim-normalised inputs; raises QueryRefused."""


class InProcessTarget(QueryTarget):
    """The victim behind an optional Guardian, as one client.

    ``mean``/``std`` describe the victim's normalisation; with ``quantize=True`` each query is
    rounded to 8-bit pixels first, as it would be when sent as a PNG over HTTP.
    """

    def __init__(self, victim: nn.Module, num_classes: int, guardian=None, client_id: str = "attacker",
                 device: str | torch.device = "cpu", quantize: bool = False, mean=None, std=None):
        self.victim = victim.eval().to(device)
        self.num_classes = num_classes
        self.guardian = guardian
        self.client_id = client_id
        self.device = torch.device(device)
        self.quantize = quantize
        self.mean = torch.tensor(mean if mean is not None else [0.0]).view(1, -1, 1, 1).to(self.device)
        self.std = torch.tensor(std if std is not None else [1.0]).view(1, -1, 1, 1).to(self.device)
        self.queries = 0
        self.flagged = 0
        self.refused_at: Optional[int] = None

    def _as_sent(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` on the target's device as the victim receives it: detached and, with ``quantize``,
        rounded to 8-bit pixels and normalised back."""
        x = x.detach().to(self.device)
        if self.quantize:
            pix = (x * self.std + self.mean).clamp(0, 1)
            x = ((pix * 255).round() / 255 - self.mean) / self.std
        return x

    @torch.no_grad()
    def query(self, x: torch.Tensor) -> torch.Tensor:
        x = self._as_sent(x)
        b = x.shape[0]
        if self.guardian is not None and self.guardian.refused([self.client_id])[0]:
            if self.refused_at is None:
                self.refused_at = self.queries
            raise QueryRefused(self.client_id)
        probs = torch.softmax(self.victim(x), 1)
        if self.guardian is None:
            self.queries += b
            return probs
        # one request: the batch's rows share one admission, so a batch the client crosses the rule
        # inside is not answered (Guardian.inspect)
        r = self.guardian.inspect(x, probs, [Admission(client=self.client_id)] * b, refused=[False] * b)
        cut = next((d for d in r.cut if d is not None), None)
        if cut is not None:
            self.refused_at = self.queries
            raise QueryRefused(self.client_id, status=cut.status, retry_after=cut.retry_after)
        self.queries += b
        self.flagged += sum(r.flagged)
        return r.probs


class EvalTarget(InProcessTarget):
    """:class:`InProcessTarget` plus what the harness measures and what attackers may do:

    - ``always``: a response policy applied to every row (DPreds-only configuration);
    - ``flags``: one byte per answered query, 1 when the detector flagged it;
    - ``rotate_identity()``: continue as a new client id (the target side of id rotation);
    - ``record``: copies of the queries at given offsets of the stream (Table II windows).
    """

    def __init__(self, victim: nn.Module, num_classes: int, guardian=None, always=None, client_id: str = "attacker",
                 device="cpu", quantize: bool = False, mean=None, std=None, record_starts=(), record_len: int = 0):
        super().__init__(victim, num_classes, guardian, client_id, device, quantize, mean, std)
        self.always = always
        self.base_id = client_id
        self.identities = 1
        self.flags = bytearray()
        self.stop_status: Optional[int] = None  # 403 refused / 429 quota: why the target stopped answering
        self.probation_answers = 0
        self.suspect_answers = 0
        self.dpreds_answers = 0  # answers changed by the response policy (DPreds), probation not included
        self.last_probation_query = 0  # 1-based index of the last query answered on probation (0: none)
        self._starts = sorted(set(int(s) for s in record_starts))
        self._len = int(record_len)
        self.recorded: Dict[int, List[torch.Tensor]] = {s: [] for s in self._starts}

    def rotate_identity(self) -> str:
        self.identities += 1
        self.client_id = f"{self.base_id}#{self.identities}"
        return self.client_id

    def _record(self, x: torch.Tensor, first: int) -> None:
        last = first + x.shape[0]
        for s in self._starts:
            lo, hi = max(s, first), min(s + self._len, last)
            if lo < hi:
                self.recorded[s].append(x[lo - first:hi - first].detach().cpu().clone())

    def recorded_windows(self) -> List[torch.Tensor]:
        return [torch.cat(v) for v in self.recorded.values() if v]

    @torch.no_grad()
    def query(self, x: torch.Tensor) -> torch.Tensor:
        x = self._as_sent(x)
        b = x.shape[0]
        admitted = None
        if self.guardian is not None:
            # a batch is answered whole or not at all: one denied row (refused, or over the quota) denies it
            admitted = self.guardian.admit_clients([self.client_id] * b)
            denied = next((a.denial for a in admitted if not a.ok), None)
            if denied is not None:
                if self.refused_at is None:
                    self.refused_at, self.stop_status = self.queries, denied.status
                raise QueryRefused(self.client_id, status=denied.status, retry_after=denied.retry_after)
        probs = self.model_probs = torch.softmax(self.victim(x), 1)  # the unprotected answer, kept for checks
        if self.always is not None:
            probs = self.always(probs, torch.ones(b, dtype=torch.bool, device=probs.device))
        if self.guardian is not None:
            r = self.guardian.inspect(x, probs, admitted)
            # the batch is one request (its rows share one admission): crossing the rule inside it denies it
            cut = next((d for d in r.cut if d is not None), None)
            if cut is not None:
                if self.refused_at is None:
                    self.refused_at, self.stop_status = self.queries, cut.status
                raise QueryRefused(self.client_id, status=cut.status, retry_after=cut.retry_after)
        self._record(x, self.queries)
        self.queries += b
        if self.always is not None:
            self.dpreds_answers += b
        if self.guardian is None:
            return probs
        self.flagged += sum(r.detected)
        self.flags.extend(bytes(int(v) for v in r.detected))
        self.probation_answers += sum(r.probation)
        self.dpreds_answers += sum(d and not p for d, p in zip(r.deceived, r.probation))
        for k, on in enumerate(r.probation):
            if on:
                self.last_probation_query = self.queries - b + k + 1
        self.suspect_answers += sum(f and not d for f, d in zip(r.flagged, r.detected))
        return r.probs


# ------------------------------------------------------------------------------ HTTP targets
def png_bytes(pixels01: torch.Tensor) -> bytes:
    """A (C, H, W) [0, 1] image as PNG bytes (grayscale for C=1, RGB for C=3)."""
    from PIL import Image

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
    import requests

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
    """One client of a model served by TorchServe, ``{url}/predictions/{model}``, identified by ``headers``
    (e.g. X-Client-Id): every image is one HTTP request.

    Each victim-normalised input is mapped back to pixels, rounded to 8 bits and sent as a PNG, as a real
    client would. Responses are TorchServe ImageClassifier JSON (``{label: probability}``, top-k); classes
    missing from a top-k answer share the remaining mass equally (:func:`parse_topk`). A 403 answer means
    the client is refused: :class:`QueryRefused` is raised."""

    def __init__(self, url: str, model: str, num_classes: int, mean: Sequence[float], std: Sequence[float],
                 client_id: Optional[str] = None, headers: Optional[Dict[str, str]] = None,
                 labels: Optional[Sequence[str]] = None, concurrency: int = 8, timeout_s: float = 60.0):
        http_client_setup(self, f"{url.rstrip('/')}/predictions/{model}", num_classes, mean, std, client_id,
                          headers, timeout_s)
        self.labels = labels
        self._pool = ThreadPoolExecutor(max_workers=concurrency)

    def _post(self, body: bytes):
        return self._session.post(self.endpoint, data=body, headers=self.headers, timeout=self.timeout_s)

    def send(self, bodies: List[bytes]) -> list:
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


class BentoTarget(QueryTarget):
    """An attack's view of a served BentoML classifier: one client (``X-Client-Id``), every image one
    query. (``guardian_plugin.bento.BentoTarget`` is this class, built lazily so that serving never
    imports the attack package.)

    Inputs are victim-normalised tensors; each image is mapped back to pixels with ``mean``/``std``,
    rounded to 8 bits and sent as a PNG, as a real client would. ``batch_field`` set: one multipart
    request per query batch to a batchable API taking a list of images (answer ``(B, K)``); else one
    request per image to ``field`` (answer ``(K,)``), sent concurrently. A 403 raises QueryRefused.
    """

    def __init__(self, url: str, api: str = "classify_batch", num_classes: int = 10, mean=(0.1307,), std=(0.3081,),
                 client_id: Optional[str] = "attacker", headers: Optional[dict] = None,
                 batch_field: Optional[str] = "images", field: str = "image", concurrency: int = 8,
                 timeout_s: float = 120.0):
        http_client_setup(self, url.rstrip("/") + "/" + api.lstrip("/"), num_classes, mean, std, client_id, headers,
                          timeout_s)
        self.batch_field, self.field = batch_field, field
        self.concurrency = concurrency

    def _refused(self):
        if self.refused_at is None:
            self.refused_at = self.queries
        raise QueryRefused(self.headers.get("X-Client-Id", "client"))

    def _count(self, r):
        self.statuses[r.status_code] = self.statuses.get(r.status_code, 0) + 1

    @torch.no_grad()
    def query(self, x: torch.Tensor) -> torch.Tensor:
        pix = (x.detach().cpu().float() * self.std + self.mean).clamp(0, 1)
        pngs = [png_bytes(p) for p in pix]
        if self.batch_field:
            r = self._session.post(self.endpoint, headers=self.headers, timeout=self.timeout_s,
                                   files=[(self.batch_field, (f"{i}.png", b, "image/png")) for i, b in enumerate(pngs)])
            self._count(r)
            if r.status_code == 403:
                self._refused()
            if r.status_code != 200:
                raise RuntimeError(f"{self.endpoint}: HTTP {r.status_code} {r.text[:200]}")
            self.queries += len(pngs)
            return torch.tensor(r.json(), dtype=torch.float32).view(len(pngs), self.num_classes)

        def post(b):
            return self._session.post(self.endpoint, headers=self.headers, timeout=self.timeout_s,
                                      files={self.field: ("x.png", b, "image/png")})

        with ThreadPoolExecutor(self.concurrency) as ex:
            resps = list(ex.map(post, pngs))
        out = []
        for r in resps:
            self._count(r)
            if r.status_code == 403:
                self._refused()
            if r.status_code != 200:
                raise RuntimeError(f"{self.endpoint}: HTTP {r.status_code} {r.text[:200]}")
            self.queries += 1
            out.append(torch.tensor(r.json(), dtype=torch.float32).view(self.num_classes))
        return torch.stack(out)

    def close(self):
        self._session.close()
