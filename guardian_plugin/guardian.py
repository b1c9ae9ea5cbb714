"""Guardian: the four steps of one request, nothing framework-specific (DESIGN.md).

    refused = guardian.refused(client_ids)           # before inference: who gets no answer
    result  = guardian.inspect(inputs, probs, ids)   # after inference
    result.probs       what to return (DPreds on flagged rows, unchanged otherwise)
    result.verdicts    one Verdict per row: BENIGN, FLAGGED or REFUSED

``inputs`` is the served model's preprocessed batch; the detector's input mapping turns it back into
[0, 1] pixel images. Rows of refused clients (refused before this batch) are neither scored nor
counted. A client that crosses the rule in this batch still gets this batch's answers; refusal starts
with its next request.
"""

from __future__ import annotations

import enum
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch

from guardian_plugin.config import GuardConfig, load_config
from guardian_plugin.detector import Detector, load_detector
from guardian_plugin.ledger import Ledger, RefusalRule, open_ledger
from guardian_plugin.responses import build_policy

log = logging.getLogger("guardian_plugin")


class Verdict(str, enum.Enum):
    BENIGN = "benign"
    FLAGGED = "flagged"
    REFUSED = "refused"


@dataclass
class InspectResult:
    probs: torch.Tensor
    verdicts: List[Verdict]
    scores: Optional[torch.Tensor] = None  # (B, K) sub-detector logits, NaN rows for refused
    guard_ms: float = 0.0
    states: dict = field(default_factory=dict)  # client id -> ClientState after this batch

    @property
    def flagged(self) -> List[bool]:
        return [v == Verdict.FLAGGED for v in self.verdicts]


class Guardian:
    def __init__(self, detector: Detector, ledger: Ledger, policy=None, device: str | torch.device = "cpu"):
        self.detector = detector.to(device)
        self.ledger = ledger
        self.policy = policy if policy is not None else build_policy("dpreds", d=0.5)
        self.device = torch.device(device)
        self.counters = {"queries": 0, "flagged": 0, "refused": 0}

    # ------------------------------------------------------------------------- construction
    @classmethod
    def from_config(cls, config: GuardConfig | str, ledger: Ledger | None = None, model=None) -> "Guardian":
        cfg = load_config(config) if isinstance(config, str) else config
        detector = load_detector(cfg.detector, device=cfg.device)
        if model is not None:  # a guardian_plugin.fit.ModelSpec: refuse a detector trained for another model
            from guardian_plugin.fit import check_fit
            check_fit(detector.spec, model, cfg.allow_mismatch)
        if ledger is None:
            from guardian_plugin.ledger.resilient import ResilientLedger

            ledger = ResilientLedger(open_ledger(cfg.ledger, cfg.rule.to_rule(), cfg.namespace), cfg.ledger_failure)
        policy = build_policy(cfg.response.policy, **cfg.response.params())
        return cls(detector, ledger, policy, cfg.device)

    @classmethod
    def from_artifact(cls, path: str, ledger: Ledger | str = "memory://", rule: RefusalRule | None = None,
                      policy=None, device: str = "cpu", namespace: str = "default") -> "Guardian":
        """A Guardian from a detector artifact directory with explicit settings (Python use)."""
        if isinstance(ledger, str):
            ledger = open_ledger(ledger, rule or RefusalRule(), namespace)
        return cls(load_detector(path, device=device), ledger, policy, device)

    # ------------------------------------------------------------------------------ steps
    def refused(self, client_ids: Sequence[str]) -> List[bool]:
        """Whether each row's client is refused now (check before running the victim)."""
        cache = {}
        for c in client_ids:
            if c not in cache:
                cache[c] = self.ledger.is_denied(c)
        return [cache[c] for c in client_ids]

    def detect(self, inputs: torch.Tensor):
        """(flagged (B,), scores (B, K)) for a served model's preprocessed batch."""
        pix = self.detector.to_pixels(inputs.to(self.device))
        return self.detector.flag(pix)

    def inspect(self, inputs: torch.Tensor, probs: torch.Tensor, client_ids: Sequence[str],
                refused: Optional[Sequence[bool]] = None) -> InspectResult:
        t0 = time.perf_counter()
        b = probs.shape[0]
        if inputs.shape[0] != b or len(client_ids) != b:
            raise ValueError(f"batch mismatch: {inputs.shape[0]} inputs, {b} probability rows, {len(client_ids)} ids")
        refused = list(refused) if refused is not None else self.refused(client_ids)
        live = [i for i in range(b) if not refused[i]]
        flagged = torch.zeros(b, dtype=torch.bool)
        scores = torch.full((b, len(self.detector.names)), float("nan"))
        if live:
            f, s = self.detect(inputs[live])
            flagged[live] = f.cpu()
            scores[live] = s.float().cpu()
        # one atomic ledger update per client in this batch
        per_client: "OrderedDict[str, list]" = OrderedDict()
        for i in live:
            q = per_client.setdefault(client_ids[i], [0, 0])
            q[0] += 1
            q[1] += int(flagged[i])
        states = {}
        if per_client:
            for st in self.ledger.record_many([(c, q, f) for c, (q, f) in per_client.items()]):
                states[st.client_id] = st
                if st.refused and st.refused_at_query is not None and st.refused_at_query > st.queries - per_client[st.client_id][0]:
                    log.warning("guardian: client %r refused at query %d (flagged %d)", st.client_id,
                                st.refused_at_query, st.flagged)
        out = self.policy(probs, flagged.to(probs.device))
        verdicts = [Verdict.REFUSED if refused[i] else Verdict.FLAGGED if flagged[i] else Verdict.BENIGN for i in range(b)]
        self.counters["queries"] += len(live)
        self.counters["flagged"] += int(flagged.sum())
        self.counters["refused"] += b - len(live)
        return InspectResult(out, verdicts, scores, (time.perf_counter() - t0) * 1000.0, states)
