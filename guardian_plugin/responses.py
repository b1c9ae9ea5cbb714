"""Output policies: what a client receives for a row, given the victim's probabilities.

Deceptive Predictions (DPreds, paper eq. 7): add the same constant ``d`` to every class probability and
renormalise, ``p' = (p + d) / (1 + K d)``. The ranking of the classes (and so the argmax) is kept, while
the information in the probability values (what distillation learns from) is flattened.

Also what a request gets when it is not served: a :class:`Denial` (HTTP status + one JSON body shape,
``{"code", "type", "message"}``, the shape of TorchServe's own errors), used by every adapter.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch

from guardian_plugin.registry import Registry

RESPONSE_POLICIES: Registry = Registry("response policy")


def dpreds(probs: torch.Tensor, d: float = 0.5) -> torch.Tensor:
    """Deceptive Predictions over the last dimension. ``probs`` rows must sum to one.

    In exact arithmetic every order is kept. In floating point, two probabilities closer than the
    resolution of the result (about 1e-16 x 1/K in float64, 1e-7 x 1/K in float32) can become equal:
    an order is never inverted, and the top class is kept by construction (should rounding tie it with
    another class, it is nudged up by one unit in the last place), so argmax never changes.
    """
    if d < 0:
        raise ValueError(f"DPreds perturbation d must be >= 0, got {d}")
    k = probs.shape[-1]
    q = (probs + d) / (1.0 + k * d)
    top = probs.argmax(-1, keepdim=True)
    lost = q.argmax(-1, keepdim=True) != top
    if bool(lost.any()):
        qt = q.gather(-1, top)
        bumped = torch.nextafter(q.max(-1, keepdim=True).values, torch.full_like(qt, 2.0))
        q = q.scatter(-1, top, torch.where(lost, bumped, qt))
    return q


@RESPONSE_POLICIES.register("dpreds")
class DPreds:
    """Answer flagged rows with DPreds(d); benign rows unchanged."""

    def __init__(self, d: float = 0.5):
        if d < 0:
            raise ValueError(f"DPreds perturbation d must be >= 0, got {d}")
        self.d = float(d)

    def __call__(self, probs: torch.Tensor, flagged: torch.Tensor) -> torch.Tensor:
        if not bool(flagged.any()):
            return probs
        out = probs.clone()
        out[flagged] = dpreds(probs[flagged], self.d)
        return out


@RESPONSE_POLICIES.register("passthrough")
class Passthrough:
    """Answer every row unchanged (detector + refusal only: the paper's "w/o DPreds" row)."""

    def __call__(self, probs: torch.Tensor, flagged: torch.Tensor) -> torch.Tensor:
        return probs


def build_policy(name: str, **params):
    return RESPONSE_POLICIES.get(name)(**params)


# ------------------------------------------------------------------------- label-only models
def topk_label(probs: torch.Tensor, k: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One-hot rows at a class drawn uniformly from each row's ``k`` most probable classes (``k`` is
    capped at the class count): the top-1 with probability 1/k, and repeating a query draws again, so
    an attacker's labels on flagged queries are noisy however often it asks, and never name a class
    outside the model's top k."""
    k = max(1, min(int(k), probs.shape[-1]))
    top = torch.topk(probs, k, dim=-1).indices
    pick = torch.randint(k, top.shape[:-1] + (1,), generator=generator).to(top.device)
    return torch.zeros_like(probs).scatter_(-1, top.gather(-1, pick), 1.0)


class LabelOnlyResponse:
    """What a flagged row gets when the served model answers labels only (a TorchServe archive whose
    postprocess returns the argmax, e.g. TorchServe's MNIST example), where DPreds changes nothing the
    client sees (same ranking, so the same label): ``top1`` keeps the model's label (the default: the
    detector and the refusal rule still work, the answers do not deceive), ``topk`` answers a label drawn
    uniformly from the model's top ``k`` classes (:func:`topk_label`). guard config: ``response:
    {label_only: topk, k: 2}``; docs/torchserve.md measures what it costs benign clients."""

    def __init__(self, mode: str = "top1", k: int = 2, seed: Optional[int] = None):
        if mode not in ("top1", "topk"):
            raise ValueError(f"label_only must be top1 or topk, got {mode!r}")
        if k < 2:
            raise ValueError(f"label_only k must be >= 2, got {k}")
        self.mode, self.k = mode, int(k)
        self.generator = torch.Generator()
        self.generator.manual_seed(seed if seed is not None else secrets.randbits(63))

    @property
    def changes_labels(self) -> bool:
        return self.mode == "topk"

    def __call__(self, probs: torch.Tensor, flagged: torch.Tensor) -> Optional[torch.Tensor]:
        """One-hot answers for the ``flagged`` rows (the rest zero), or None when the labels are kept."""
        if not self.changes_labels or not bool(flagged.any()):
            return None
        out = torch.zeros_like(probs)
        out[flagged] = topk_label(probs[flagged], self.k, self.generator)
        return out

    def describe(self) -> str:
        if self.changes_labels:
            return f"flagged queries get a label drawn uniformly from the model's top {self.k} classes " \
                   f"(response.label_only: topk, k: {self.k})"
        return "flagged queries get the model's own label (response.label_only: top1); set response: " \
               "{label_only: topk, k: 2} to answer them with a label drawn from the top 2 classes"


# ------------------------------------------------------------------------- admission and denials
@dataclass(frozen=True)
class Denial:
    """A request answered without the model: the same HTTP status and JSON body in every adapter."""

    status: int
    kind: str
    message: str
    retry_after: Optional[int] = None  # seconds, sent as the Retry-After header

    def body(self) -> dict:
        return {"code": self.status, "type": self.kind, "message": self.message}

    def headers(self) -> Dict[str, str]:
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}

    @classmethod
    def bad_input(cls, kind: str, message: str) -> "Denial":
        return cls(400, kind, message)


REFUSED = Denial(403, "ClientRefused", "this client is refused: too many of its queries were flagged as "
                                       "synthetic (data-free model stealing) inputs")
BLOCKED = Denial(403, "ClientBlocked", "this client is blocked by the operator")
UNAVAILABLE = Denial(503, "LedgerUnavailable", "the per-client store is unavailable; try again later",
                     retry_after=5)


def quota_exceeded(retry_after: int) -> Denial:
    """HTTP 429: the client's quota for this period is used up (docs/refusal-rule.md)."""
    return Denial(429, "QuotaExceeded", "this client's query quota for the current period is used up; "
                                        f"try again in {retry_after} s", retry_after=retry_after)


def label_only(probs: torch.Tensor) -> torch.Tensor:
    """The top-1 label as a one-hot row: what a new client on probation gets (top-1 exact, nothing else)."""
    return torch.zeros_like(probs).scatter_(-1, probs.argmax(-1, keepdim=True), 1.0)


@dataclass(frozen=True)
class Admission:
    """What ``Guardian.admit`` decided for one request: a client to serve (``client`` None for an
    anonymous request), or a denial. ``probation``: a new identity without a benign history yet;
    ``suspect``: the client's last block of queries failed the distribution test (guardian_plugin.
    distribution), so its queries are treated as flagged. ``holds``: the tokens of the quota holds its
    queries were granted under (docs/ledger.md: committed with the answer, else released after their lease).
    ``would``: in observe mode, the denial that was decided and not applied (the request is served)."""

    client: Optional[str] = None
    denial: Optional[Denial] = None
    probation: bool = False
    suspect: bool = False
    holds: Tuple[str, ...] = ()
    # observe mode (Guardian.observe): the denial enforce mode would have answered with, not applied
    would: Optional[Denial] = None
    # the client's ledger state at admission (a guardian_plugin.ledger.ClientState): where
    # Guardian.inspect starts applying the rule row by row
    state: Optional[object] = field(default=None, compare=False, hash=False, repr=False)

    @property
    def ok(self) -> bool:
        return self.denial is None

    @property
    def anonymous(self) -> bool:
        return self.denial is None and self.client is None
