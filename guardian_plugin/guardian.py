"""Guardian: one request's whole way through Model-Guardian, nothing framework-specific (DESIGN.md).

    admissions = guardian.admit_batch(headers_per_request)   # before inference
        identity (guardian_plugin.identity)      -> 401 no identity / untrusted gateway, 400 malformed id
        the ledger: refused or blocked client     -> 403
                    quota of the period used up   -> 429 + Retry-After (reserved atomically per client)
                    store down (ledger_failure: closed) -> 503 + Retry-After
                    new identity (probation), last block failed the distribution test (suspect)
    ... the adapter runs the served model on the admitted rows only (a bad row -> 400, that row alone)
    result = guardian.inspect(inputs, probs, admissions)      # after inference, answered rows only
        1. transform + detector: flagged rows                  (guardian_plugin.detector)
           rows of suspect clients count as flagged too        (guardian_plugin.distribution)
        2. ledger: one atomic (queries, flagged, bins) update per client; the rules refuse from the next
           request
        3. response policy: DPreds on flagged and anonymous rows, the rest unchanged; every row of a
           client on probation gets the probation response (default: the top-1 label only)
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
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Union

import torch

from guardian_plugin.config import GuardConfig, IdentityConfig, ProbationConfig, load_config
from guardian_plugin.detector import Detector, load_detector
from guardian_plugin.distribution import DistributionTest, load_reference
from guardian_plugin.errors import ConfigError, LedgerUnavailable
from guardian_plugin.identity import Identity, IdentityError
from guardian_plugin.ledger import Ledger, RefusalRule, open_ledger
from guardian_plugin.responses import (BLOCKED, REFUSED, UNAVAILABLE, Admission, Denial, build_policy, dpreds,
                                       label_only, quota_exceeded)

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
    deceived: List[bool] = field(default_factory=list)  # rows whose answer differs from the model's
    detected: List[bool] = field(default_factory=list)  # rows the detector flagged (per-sample)
    probation: List[bool] = field(default_factory=list)  # rows answered with the probation response
    pending: list = field(default_factory=list)  # inspect(record=False): the rows Guardian.commit records

    @property
    def flagged(self) -> List[bool]:
        """Rows counted as flagged: by the detector, or of a client failing the distribution test."""
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
    """``probation``: every answer of a new identity gets the probation response until it has that
    many unflagged answered queries (off when None or 0 queries). ``distribution``: the per-client
    distribution test; the ledger's rule must then keep ``distribution.reference.bins`` bins in blocks
    of ``distribution.block`` (``RefusalRule(dist_bins=..., dist_block=...)``)."""

    def __init__(self, detector: Detector, ledger: Ledger, policy=None, device: str | torch.device = "cpu",
                 identity: Identity | IdentityConfig | None = None, probation: ProbationConfig | None = None,
                 distribution: DistributionTest | None = None):
        self.detector = detector.to(device)
        self.ledger = ledger
        self.policy = policy if policy is not None else build_policy("dpreds", d=0.5)
        self.device = torch.device(device)
        self.identity = identity if isinstance(identity, Identity) else Identity(identity)
        self.probation = probation if probation is not None and probation.queries > 0 else None
        self.distribution = distribution
        self._dist_warned = False
        if distribution is not None and (ledger.rule.dist_bins != distribution.reference.bins
                                         or ledger.rule.dist_block != distribution.block):
            raise ConfigError(f"the ledger's rule keeps {ledger.rule.dist_bins} bins in blocks of "
                              f"{ledger.rule.dist_block}; the distribution test needs {distribution.reference.bins} "
                              f"in blocks of {distribution.block}")
        self.counters = {"queries": 0, "flagged": 0, "refused": 0, "quota": 0, "suspect": 0, "probation": 0}

    # ------------------------------------------------------------------------- construction
    @classmethod
    def from_config(cls, config: GuardConfig | str, ledger: Ledger | None = None, model=None) -> "Guardian":
        cfg = load_config(config) if isinstance(config, str) else config
        identity = Identity(cfg.identity)  # checks the secrets before anything is loaded
        detector = load_detector(cfg.detector, device=cfg.device)
        if model is not None:  # a guardian_plugin.fit.ModelSpec: refuse a detector trained for another model
            from guardian_plugin.fit import check_fit
            check_fit(detector.spec, model, cfg.allow_mismatch)
        dist = distribution_test(cfg)
        if ledger is None:
            from guardian_plugin.ledger.resilient import ResilientLedger

            rule = cfg.rule.to_rule(cfg.quota, dist.reference.bins if dist else 0, dist.block if dist else 0)
            ledger = ResilientLedger(open_ledger(cfg.ledger, rule, cfg.namespace), cfg.ledger_failure)
        policy = build_policy(cfg.response.policy, **cfg.response.params())
        return cls(detector, ledger, policy, cfg.device, identity, cfg.probation, dist)

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
        """``admit`` for a batch of requests: one ledger call for all its clients."""
        out: List[Optional[Admission]] = []
        ids: List[Optional[str]] = []
        for h in headers:
            try:
                ids.append(self.identity.client_id(h))
                out.append(None)
            except IdentityError as e:
                ids.append(None)
                out.append(Admission(denial=Denial(e.status, e.kind, str(e))))
        rows = [i for i, a in enumerate(out) if a is None]
        for i, a in zip(rows, self.admit_clients([ids[i] for i in rows])):
            out[i] = a
        return out

    def admit_clients(self, clients: Sequence[Optional[str]]) -> List[Admission]:
        """Admission of one row per entry of ``clients`` (identified client ids; None: anonymous) under
        the refusal rule and the quotas (reserved atomically, one reservation per distinct client: a
        client's rows beyond what its quota grants get 429), with the client's probation and
        distribution-test standing. Python use (the evaluation harness); adapters call ``admit_batch``."""
        wanted = Counter(c for c in clients if c is not None)  # rows per client, in order of appearance
        try:
            res = dict(zip(wanted, self.ledger.reserve_many(list(wanted.items())))) if wanted else {}
        except LedgerUnavailable:
            return [Admission(denial=UNAVAILABLE) if c is not None else Admission() for c in clients]
        standing = {c: self._standing(r) for c, r in res.items()}
        left = {c: r.granted for c, r in res.items()}
        out = []
        for c in clients:
            if c is None:
                out.append(Admission())
                continue
            adm = standing[c]
            if adm.ok:
                if left[c] <= 0:
                    self.counters["quota"] += 1
                    adm = Admission(client=c, denial=quota_exceeded(res[c].retry_after or 1))
                left[c] -= 1
            out.append(adm)
        return out

    def _standing(self, r) -> Admission:
        st = r.state
        if st.blocked:
            return Admission(client=st.client_id, denial=BLOCKED)
        if st.refused:
            return Admission(client=st.client_id, denial=REFUSED)
        probation = self.probation is not None and st.queries - st.flagged < self.probation.queries
        suspect = self.distribution is not None and self.distribution.fails(st.dist_counts)
        return Admission(client=st.client_id, probation=probation, suspect=suspect, holds=(r.hold,) if r.hold else ())

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
                refused: Optional[Sequence[bool]] = None, record: bool = True) -> InspectResult:
        """Detection, the ledger update and the response policy for the answered rows of a batch.

        ``clients``: one Admission (from ``admit``) or plain client id per row. Rows of denied admissions
        (or, for plain ids, of clients refused before this batch) are neither scored nor counted. Plain
        ids carry no probation or distribution-test standing (use ``admit_clients`` for that).
        Raises LedgerUnavailable when the store is down and ``ledger_failure`` is closed.

        ``record=False``: the ledger is not written; the caller sends the answers' ledger update (and
        commits the admissions' quota holds) with :meth:`commit` right before the answers leave."""
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
        bins = [None] * b
        if live:
            f, s = self.detect(inputs[live])
            flagged[live] = f.cpu()
            scores[live] = s.float().cpu()
            if self.distribution is not None and self._distribution_applies(inputs):
                for i, v in zip(live, self.distribution.reference.bin_of(probs[live], s, self.detector.thresholds)):
                    bins[i] = int(v)
        suspect = torch.tensor([adm[i].suspect and not denied[i] for i in range(b)], dtype=torch.bool)
        counted = flagged | suspect  # what the refusal rule sees
        answered = [(adm[i].client, bool(counted[i]), bins[i]) for i in live]
        states = self._record(answered, holds_of(adm)) if record else {}
        deceive = counted | torch.tensor([adm[i].anonymous and not denied[i] for i in range(b)], dtype=torch.bool)
        out = self.policy(probs, deceive.to(probs.device))
        # every answer of a client on probation, flagged or not: DPreds can be inverted by an attacker who
        # estimates d (guardian_plugin.attacks.aware), a label cannot, so a fresh id buys only labels
        on_probation = torch.tensor([adm[i].probation and not denied[i] for i in range(b)], dtype=torch.bool)
        if bool(on_probation.any()):
            rows = on_probation.to(probs.device)
            out = out.clone()
            out[rows] = label_only(probs[rows]) if self.probation.response == "label" else dpreds(probs[rows], getattr(self.policy, "d", 0.5))
        verdicts = [Verdict.REFUSED if denied[i] else Verdict.FLAGGED if counted[i] else Verdict.BENIGN for i in range(b)]
        self.counters["queries"] += len(live)
        self.counters["flagged"] += int(flagged.sum())
        self.counters["suspect"] += int(suspect.sum())
        self.counters["probation"] += int(on_probation.sum())
        self.counters["refused"] += b - len(live)
        return InspectResult(out, verdicts, scores, (time.perf_counter() - t0) * 1000.0, states,
                             (deceive | on_probation).tolist(), flagged.tolist(), on_probation.tolist(),
                             [] if record else answered)

    def commit(self, results: Sequence[InspectResult], admissions: Sequence[Admission]) -> dict:
        """The ledger update of answers about to be sent: the rows of ``results`` (from
        ``inspect(..., record=False)``) in one atomic update per client, and the quota holds of
        ``admissions`` made final (docs/ledger.md). Call it after the answers are built, right before
        they leave. Raises LedgerUnavailable like ``inspect``."""
        states = self._record([r for res in results for r in res.pending], holds_of(admissions))
        for res in results:
            res.states = {c: states[c] for c, *_ in res.pending if c in states}
        return states

    def _distribution_applies(self, inputs: torch.Tensor) -> bool:
        """Whether the distribution test's reference describes these inputs (see DistributionTest)."""
        if not self.distribution.native_only:
            return True
        size = self.detector.spec.image.size
        if tuple(inputs.shape[-2:]) == (size, size):
            return True
        if not self._dist_warned:
            self._dist_warned = True
            log.warning("guardian: distribution test not applied: the served inputs are %s px, its reference was "
                        "built on %d px inputs (set distribution.enabled: true to apply it anyway, or build a "
                        "reference on the served path; docs/refusal-rule.md)", "x".join(map(str, inputs.shape[-2:])),
                        size)
        return False

    def _record(self, rows: Sequence[tuple], holds: Sequence[tuple] = ()) -> dict:
        """One atomic ledger update per identified client of the answered rows: (client, counted as
        flagged, distribution-test bin or None) per row; commits the (client, hold token) ``holds``."""
        per_client: "OrderedDict[str, list]" = OrderedDict()
        nbins = self.distribution.reference.bins if self.distribution is not None else 0
        for cid, is_flagged, b in rows:
            if cid is None:  # anonymous: no client to count (guardian_plugin.identity)
                continue
            q = per_client.setdefault(cid, [0, 0, [0] * nbins])
            q[0] += 1
            q[1] += int(is_flagged)
            if b is not None:
                q[2][b] += 1
        states = {}
        if per_client or holds:
            updates = [(c, q, f, tuple(h)) if nbins else (c, q, f) for c, (q, f, h) in per_client.items()]
            for st in self.ledger.record_many(updates, commit=holds):
                states[st.client_id] = st
                if crossed(st, per_client[st.client_id][0]):
                    log.warning("guardian: client %r refused at query %d (flagged %d)", st.client_id,
                                st.refused_at_query, st.flagged)
        return states


def holds_of(admissions: Sequence[Admission]) -> List[tuple]:
    """The (client, hold token) pairs of the admissions' quota holds, each once."""
    return list(dict.fromkeys((a.client, h) for a in admissions if isinstance(a, Admission) and a.client
                              for h in a.holds))


def distribution_test(cfg: GuardConfig) -> Optional[DistributionTest]:
    """The config's distribution test: on with the artifact's reference.json (``enabled: auto``)."""
    d = cfg.distribution
    if d.enabled is False:
        return None
    ref = load_reference(cfg.detector)
    if ref is None:
        if d.enabled is True:
            raise ConfigError(f"distribution.enabled is true but {cfg.detector} has no reference.json "
                              "(guardian reference --config TRAIN_CONFIG --detector DIR)")
        return None
    return DistributionTest(ref, d.block, d.max_false, d.horizon, native_only=d.enabled == "auto")
