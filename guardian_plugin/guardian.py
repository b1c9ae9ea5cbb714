"""Guardian: one request's whole way through Model-Guardian, nothing framework-specific (DESIGN.md).

    admissions = guardian.admit_batch(headers_per_request)   # before inference
        identity (guardian_plugin.identity)      -> 401 no identity / untrusted gateway, 400 malformed id
        the ledger: refused or blocked client     -> 403
                    store down (ledger_failure: closed) -> 503 + Retry-After
    ... the adapter runs the served model on the admitted rows only (a bad row -> 400, that row alone)
    result = guardian.inspect(inputs, probs, admissions)      # after inference, answered rows only
        1. transform + detector: flagged rows                  (guardian_plugin.detector)
        2. ledger: one atomic (queries, flagged) update per client; the rule refuses from the next request
        3. response policy: DPreds on flagged and anonymous rows, the rest unchanged
    result.probs      what to return
    result.verdicts   one Verdict per row

Adapters (TorchServe handler, BentoML decorator) only translate between their framework and these two
calls; a :class:`~guardian_plugin.responses.Denial` carries the HTTP status and the JSON body, so the
same situation gets the same answer in both. ``inputs`` is the served model's preprocessed batch; the
detector's input mapping turns it back into [0, 1] pixel images. A client that crosses the rule in a
batch still gets that batch's answers; refusal starts with its next request.

For Python use (the evaluation harness), ``inspect`` also takes plain client ids, and ``refused(ids)``
says who is refused.
"""

from __future__ import annotations

import enum
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Union

import torch

from guardian_plugin.config import GuardConfig, IdentityConfig, load_config
from guardian_plugin.detector import Detector, load_detector
from guardian_plugin.errors import LedgerUnavailable
from guardian_plugin.identity import Identity, IdentityError
from guardian_plugin.ledger import Ledger, RefusalRule, open_ledger
from guardian_plugin.responses import BLOCKED, REFUSED, UNAVAILABLE, Admission, Denial, build_policy

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
    deceived: List[bool] = field(default_factory=list)  # rows answered with the response policy

    @property
    def flagged(self) -> List[bool]:
        return [v == Verdict.FLAGGED for v in self.verdicts]

    def newly_refused(self, clients: Sequence[Optional[str]]) -> int:
        """How many clients crossed the refusal rule with this batch."""
        rows: Dict[str, int] = {}
        for c in clients:
            if c is not None:
                rows[c] = rows.get(c, 0) + 1
        return sum(1 for c, s in self.states.items() if crossed(s, rows.get(c, 0)))


def crossed(state, rows: int) -> bool:
    """Whether a client's state after an update of ``rows`` queries shows the refusal happening in it."""
    return state.refused and state.refused_at_query is not None and state.refused_at_query > state.queries - rows


Client = Union[str, Admission]


class Guardian:
    def __init__(self, detector: Detector, ledger: Ledger, policy=None, device: str | torch.device = "cpu",
                 identity: Identity | IdentityConfig | None = None):
        self.detector = detector.to(device)
        self.ledger = ledger
        self.policy = policy if policy is not None else build_policy("dpreds", d=0.5)
        self.device = torch.device(device)
        self.identity = identity if isinstance(identity, Identity) else Identity(identity)
        self.counters = {"queries": 0, "flagged": 0, "refused": 0}

    # ------------------------------------------------------------------------- construction
    @classmethod
    def from_config(cls, config: GuardConfig | str, ledger: Ledger | None = None, model=None) -> "Guardian":
        cfg = load_config(config) if isinstance(config, str) else config
        identity = Identity(cfg.identity)  # checks the secrets before anything is loaded
        detector = load_detector(cfg.detector, device=cfg.device)
        if model is not None:  # a guardian_plugin.fit.ModelSpec: refuse a detector trained for another model
            from guardian_plugin.fit import check_fit
            check_fit(detector.spec, model, cfg.allow_mismatch)
        if ledger is None:
            from guardian_plugin.ledger.resilient import ResilientLedger

            ledger = ResilientLedger(open_ledger(cfg.ledger, cfg.rule.to_rule(), cfg.namespace), cfg.ledger_failure)
        policy = build_policy(cfg.response.policy, **cfg.response.params())
        return cls(detector, ledger, policy, cfg.device, identity)

    @classmethod
    def from_artifact(cls, path: str, ledger: Ledger | str = "memory://", rule: RefusalRule | None = None,
                      policy=None, device: str = "cpu", namespace: str = "default",
                      identity: IdentityConfig | None = None) -> "Guardian":
        """A Guardian from a detector artifact directory with explicit settings (Python use)."""
        if isinstance(ledger, str):
            ledger = open_ledger(ledger, rule or RefusalRule(), namespace)
        return cls(load_detector(path, device=device), ledger, policy, device, identity)

    # ------------------------------------------------------------------------ admission
    def admit(self, headers: Mapping | None) -> Admission:
        """Whether one request may reach the model, and as which client."""
        return self.admit_batch([headers])[0]

    def admit_batch(self, headers: Sequence[Mapping | None]) -> List[Admission]:
        """``admit`` for a batch of requests, one ledger read per distinct client."""
        out: List[Admission] = []
        states: Dict[str, Denial | None] = {}
        for h in headers:
            try:
                cid = self.identity.client_id(h)
            except IdentityError as e:
                out.append(Admission(denial=Denial(e.status, e.kind, str(e))))
                continue
            if cid is not None and cid not in states:
                states[cid] = self._standing(cid)
            out.append(Admission(client=cid, denial=states.get(cid) if cid is not None else None))
        return out

    def _standing(self, cid: str) -> Optional[Denial]:
        try:
            st = self.ledger.get(cid)
        except LedgerUnavailable:
            return UNAVAILABLE
        if st.blocked:
            return BLOCKED
        return REFUSED if st.refused else None

    def refused(self, client_ids: Sequence[str]) -> List[bool]:
        """Whether each row's client is refused now (Python use; adapters call ``admit``)."""
        cache: Dict[str, bool] = {}
        for c in client_ids:
            if c not in cache:
                cache[c] = self.ledger.is_denied(c)
        return [cache[c] for c in client_ids]

    # ------------------------------------------------------------------------ inspection
    def detect(self, inputs: torch.Tensor):
        """(flagged (B,), scores (B, K)) for a served model's preprocessed batch."""
        pix = self.detector.to_pixels(inputs.to(self.device))
        return self.detector.flag(pix)

    def inspect(self, inputs: torch.Tensor, probs: torch.Tensor, clients: Sequence[Client],
                refused: Optional[Sequence[bool]] = None) -> InspectResult:
        """Detection, the ledger update and the response policy for the answered rows of a batch.

        ``clients``: one Admission (from ``admit``) or plain client id per row. Rows of denied admissions
        (or, for plain ids, of clients refused before this batch) are neither scored nor counted.
        Raises LedgerUnavailable when the store is down and ``ledger_failure`` is closed."""
        t0 = time.perf_counter()
        b = probs.shape[0]
        if inputs.shape[0] != b or len(clients) != b:
            raise ValueError(f"batch mismatch: {inputs.shape[0]} inputs, {b} probability rows, {len(clients)} clients")
        adm = [c if isinstance(c, Admission) else Admission(client=c) for c in clients]
        if refused is None and any(not isinstance(c, Admission) for c in clients):
            refused = self.refused([a.client for a in adm])
        denied = [not a.ok or bool(refused and refused[i]) for i, a in enumerate(adm)]
        live = [i for i in range(b) if not denied[i]]
        flagged = torch.zeros(b, dtype=torch.bool)
        scores = torch.full((b, len(self.detector.names)), float("nan"))
        if live:
            f, s = self.detect(inputs[live])
            flagged[live] = f.cpu()
            scores[live] = s.float().cpu()
        states = self._record([(adm[i].client, bool(flagged[i])) for i in live])
        deceive = flagged | torch.tensor([adm[i].anonymous and not denied[i] for i in range(b)], dtype=torch.bool)
        out = self.policy(probs, deceive.to(probs.device))
        verdicts = [Verdict.REFUSED if denied[i] else Verdict.FLAGGED if flagged[i] else Verdict.BENIGN for i in range(b)]
        self.counters["queries"] += len(live)
        self.counters["flagged"] += int(flagged.sum())
        self.counters["refused"] += b - len(live)
        return InspectResult(out, verdicts, scores, (time.perf_counter() - t0) * 1000.0, states, deceive.tolist())

    def _record(self, rows: Sequence[tuple]) -> dict:
        """One atomic ledger update per identified client of the answered rows."""
        per_client: "OrderedDict[str, list]" = OrderedDict()
        for cid, is_flagged in rows:
            if cid is None:  # anonymous: no client to count (guardian_plugin.identity)
                continue
            q = per_client.setdefault(cid, [0, 0])
            q[0] += 1
            q[1] += int(is_flagged)
        states = {}
        if per_client:
            for st in self.ledger.record_many([(c, q, f) for c, (q, f) in per_client.items()]):
                states[st.client_id] = st
                if crossed(st, per_client[st.client_id][0]):
                    log.warning("guardian: client %r refused at query %d (flagged %d)", st.client_id,
                                st.refused_at_query, st.flagged)
        return states
