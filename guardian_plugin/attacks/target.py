"""Query targets: what an attack talks to. Every image sent is one query, counted by the target.

- :class:`InProcessTarget`  victim (+ optional Guardian) in this process; fast enough for full budgets.
- HTTP targets (TorchServe, BentoML) live next to their adapters and implement the same interface.

Inputs are victim-normalised tensors (what the victim's own preprocessing would produce), the form
data-free attacks generate. A refused client gets no answer: :class:`QueryRefused` is raised and the
attack trains on what it already has.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Optional

import torch
import torch.nn as nn


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

    @torch.no_grad()
    def query(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().to(self.device)
        b = x.shape[0]
        if self.quantize:
            pix = (x * self.std + self.mean).clamp(0, 1)
            x = ((pix * 255).round() / 255 - self.mean) / self.std
        if self.guardian is not None and self.guardian.refused([self.client_id])[0]:
            if self.refused_at is None:
                self.refused_at = self.queries
            raise QueryRefused(self.client_id)
        self.queries += b
        probs = torch.softmax(self.victim(x), 1)
        if self.guardian is None:
            return probs
        r = self.guardian.inspect(x, probs, [self.client_id] * b, refused=[False] * b)
        self.flagged += sum(r.flagged)
        return r.probs
