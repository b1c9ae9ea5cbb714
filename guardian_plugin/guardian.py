"""Guardian: one request's whole way through Model-Guardian, nothing framework-specific (docs/request-path.md).

    admissions = guardian.admit_batch(headers_per_request)   # before inference
        identity (guardian_plugin.identity)      -> 401 no identity / untrusted gateway / API key not
                                                    issued or revoked, 400 malformed id
        the ledger: refused or blocked client     -> 403
                    quota of the period used up   -> 429 + Retry-After (reserved atomically per client)
                    store down (ledger_failure: closed) -> 503 + Retry-After
                    new identity (probation), last block failed the distribution test (suspect)
    ... the adapter runs the served model on the admitted rows only (a bad row -> 400, that row alone)
    result = guardian.inspect(inputs, probs, admissions)      # after inference, answered rows only
        1. transform + detector: flagged rows                  (guardian_plugin.detector)
           rows of suspect clients count as flagged too        (guardian_plugin.distribution)
        2. ledger: atomic (queries, flagged, bins) updates per client, applied so that the rules act at
           the row where the client crosses them: its later rows are not answered (result.cut), and a
           request it crosses them inside is not answered at all
        3. response policy: DPreds on flagged and anonymous rows, the rest unchanged; every row of a
           client on probation gets the probation response (default: the top-1 label only)
    result.probs      what to return
    result.verdicts   one Verdict per row

Observe mode (``mode: observe``, ``Guardian.observe``): every step above decides as always and the ledger
records it, but nothing is applied: a denial of admission (401/400 identity, 403, 429, 503) becomes
``Admission.would`` and the request is served (without a usable identity: as an anonymous row, counted for
no client), the rows the rule cuts are answered and counted, and ``result.probs`` is the model's own
answer. ``result.would`` (the denial each row would have got), ``result.would_deceived`` and
``result.would_probation`` say what enforce mode would have done; the refusal rule's ``refused`` /
``refused_at_query`` in the ledger keep working. docs/rollout.md.

Adapters (TorchServe handler, BentoML decorator) only translate between their framework and these two
calls; a :class:`~guardian_plugin.responses.Denial` carries the HTTP status and the JSON body, so the
same situation gets the same answer in both. ``inputs`` is the served model's preprocessed batch; the
detector's input mapping turns it back into [0, 1] pixel images (``check_inputs``: a row whose pixels
lie outside [0, 1] is a 400 before the model runs). No request size buys more answers than the same
images sent one per request: the rule acts at the row where a client crosses it (``_record``).

For Python use (the evaluation harness), ``inspect`` also takes plain client ids, and ``refused(ids)``
says who is refused.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field, replace
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from guardian_plugin.config import GuardConfig, IdentityConfig, ProbationConfig, load_config
from guardian_plugin.detector import Detector, load_detector
from guardian_plugin.distribution import DistributionTest, load_reference
from guardian_plugin.errors import ConfigError, LedgerUnavailable
from guardian_plugin.identity import Identity, IdentityError
from guardian_plugin.ledger import Ledger, RefusalRule, open_ledger
from guardian_plugin.request_headers import identity_headers, identity_names
from guardian_plugin.responses import (BLOCKED, REFUSED, UNAVAILABLE, Admission, Denial, build_policy, dpreds,
                                       label_only, quota_exceeded)

log = logging.getLogger("guardian_plugin")

# how far outside [0, 1] a preprocessed input's pixels may lie (float rounding of 8-bit images normalised
# and mapped back is ~1e-7): a quarter of an 8-bit grey level
PIXEL_TOLERANCE = 1e-3

# identical queries seen recently, per process: (client, digest of the served input) pairs, least recently
# seen dropped first (about 100 bytes each: ~20 MB at the cap)
SEEN_CAP = 200_000


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
    # rows admitted but not answered: the client crossed the rule (or its flagged quota) earlier in this
    # batch, or inside the same request; the Denial to answer them with (None for the other rows)
    cut: List[Optional[Denial]] = field(default_factory=list)
    # observe mode: what enforce mode would have done with each row (the denial it would have answered,
    # admission or cut; DPreds or the probation response); in enforce mode these lists are empty
    would: List[Optional[Denial]] = field(default_factory=list)
    would_deceived: List[bool] = field(default_factory=list)
    would_probation: List[bool] = field(default_factory=list)

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
    of ``distribution.block`` (``RefusalRule(dist_bins=..., dist_block=...)``). ``observe``: decide and
    record, change no answer (the module docstring; docs/rollout.md)."""

    def __init__(self, detector: Detector, ledger: Ledger, policy=None, device: str | torch.device = "cpu",
                 identity: Identity | IdentityConfig | None = None, probation: ProbationConfig | None = None,
                 distribution: DistributionTest | None = None, observe: bool = False):
        self.detector = detector.to(device)
        self.ledger = ledger
        self.policy = policy if policy is not None else build_policy("dpreds", d=0.5)
        self.device = torch.device(device)
        self.identity = identity if isinstance(identity, Identity) else Identity(identity)
        if self.identity.key_secrets and self.identity.key_store is None:  # issued API keys: revocations
            from guardian_plugin.keys import key_store_for                 # live in the ledger's store

            self.identity.use_key_store(key_store_for(ledger), getattr(ledger, "mode", "closed"))
        self.probation = probation if probation is not None and probation.queries > 0 else None
        self.distribution = distribution
        self.observe = bool(observe)
        self._dist_warned = False
        self._seen: "OrderedDict[tuple, None]" = OrderedDict()
        self._seen_lock = threading.Lock()
        if distribution is not None and (ledger.rule.dist_bins != distribution.reference.bins
                                         or ledger.rule.dist_block != distribution.block):
            raise ConfigError(f"the ledger's rule keeps {ledger.rule.dist_bins} bins in blocks of "
                              f"{ledger.rule.dist_block}; the distribution test needs {distribution.reference.bins} "
                              f"in blocks of {distribution.block}")
        self.counters = {"queries": 0, "flagged": 0, "refused": 0, "quota": 0, "suspect": 0, "probation": 0,
                         "would_deny": 0}

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
        return cls(detector, ledger, policy, cfg.device, identity, cfg.probation, dist, observe=cfg.mode == "observe")

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
        """``admit`` for a batch of requests: one ledger call for all its clients. Only real headers
        (str or bytes values) count, and an identity header sent twice with different values is a 400
        (guardian_plugin.request_headers)."""
        out: List[Optional[Admission]] = []
        ids: List[Optional[str]] = []
        names = identity_names(self.identity.cfg)
        for h in headers:
            try:
                ids.append(self.identity.client_id(identity_headers(h, names)))
                out.append(None)
            except IdentityError as e:
                ids.append(None)
                denial = Denial(e.status, e.kind, str(e), e.retry_after)
                out.append(Admission(would=denial) if self.observe else Admission(denial=denial))
        rows = [i for i, a in enumerate(out) if a is None]
        for i, a in zip(rows, self.admit_clients([ids[i] for i in rows])):
            out[i] = replace(a)  # each request its own Admission: rows sharing one are one request (inspect)
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
            return [self._observed(Admission(client=c, denial=UNAVAILABLE)) if c is not None else Admission()
                    for c in clients]
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
                    q = quota_exceeded(res[c].retry_after or 1)
                    adm = replace(adm, would=q) if self.observe else Admission(client=c, denial=q)
                left[c] -= 1
            out.append(self._observed(adm))
        return out

    def _observed(self, adm: Admission) -> Admission:
        """In observe mode, a denied admission served all the same: its denial kept as ``would``."""
        if not self.observe or adm.denial is None:
            return adm
        return replace(adm, denial=None, would=adm.denial)

    def _standing(self, r) -> Admission:
        st = r.state
        if st.blocked:
            return Admission(client=st.client_id, denial=BLOCKED, state=st)
        if st.refused:
            return Admission(client=st.client_id, denial=REFUSED, state=st)
        probation = self.probation is not None and st.queries - st.flagged < self.probation.queries
        suspect = self.distribution is not None and self.distribution.fails(st.dist_counts)
        return Admission(client=st.client_id, probation=probation, suspect=suspect, state=st,
                         holds=(r.hold,) if r.hold else ())

    def refused(self, client_ids: Sequence[str]) -> List[bool]:
        """Whether each row's client is refused now (Python use; adapters call ``admit``)."""
        cache: Dict[str, bool] = {}
        for c in client_ids:
            if c not in cache:
                cache[c] = self.ledger.is_denied(c)
        return [cache[c] for c in client_ids]

    # ------------------------------------------------------------------------ inspection
    def check_inputs(self, inputs: torch.Tensor) -> List[Optional[Denial]]:
        """One entry per row of a served model's preprocessed batch, before the model runs: a 400 for a
        row that is no image the detector can score (its pixels, under the detector's input mapping, lie
        outside [0, 1] by more than PIXEL_TOLERANCE: a float or 16-bit image with values out of range,
        constant 1e3 or 1e30 TIFFs), else None. The detector clamps to [0, 1] what it scores, so without
        this check the model would answer an input the detector never saw. Both adapters call it on every
        row before inference. (The evaluation harness's in-process targets send tensors, not images, and
        do not: see guardian_plugin.attacks.target.)"""
        if inputs.dim() != 4:  # not an image batch: the model's own checks answer it (400 BadInput)
            return [None] * inputs.shape[0]
        lo, hi = (v.float().cpu() for v in self.detector.pixel_range(inputs.to(self.device)))
        out: List[Optional[Denial]] = []
        for a, b in zip(lo.tolist(), hi.tolist()):
            if a >= -PIXEL_TOLERANCE and b <= 1.0 + PIXEL_TOLERANCE:
                out.append(None)
            else:
                out.append(Denial.bad_input(
                    "InputOutOfRange", f"the input's pixel values run from {a:.4g} to {b:.4g} where an image's lie in "
                    "[0, 1]: send an 8-bit image (PNG, JPEG), or a float image with values in [0, 1]"))
        return out

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

        The rule is applied row by row within the batch (:meth:`_record`): once a client crosses the
        refusal rule (or uses up its flagged quota) at a row, its later rows are not answered (verdict
        REFUSED, ``result.cut`` holds their denial) and not counted, as if each row had been its own
        request. Rows that share one Admission object are one request (a BentoML list request, an
        evaluation batch): a request that the client crosses the rule inside (before its last row) is cut
        whole, so no request size buys more answers than the same images sent one per request.
        Raises LedgerUnavailable when the store is down and ``ledger_failure`` is closed.

        ``record=False``: the ledger is not written; the caller sends the answers' ledger update (and
        commits the admissions' quota holds) with :meth:`commit` right before the answers leave. Where
        the rule acts is then predicted from the clients' states at admission (:func:`first_crossing`)."""
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
                self._count_once(adm, inputs, bins)
        suspect = torch.tensor([adm[i].suspect and not denied[i] for i in range(b)], dtype=torch.bool)
        try:
            if record:
                states, cut = self._record(adm, live, flagged, suspect, bins, holds_of(adm))
            else:
                states, cut = {}, self._plan(adm, live, (flagged | suspect).tolist())
        except LedgerUnavailable:
            if not self.observe:
                raise
            log.warning("guardian: observe mode: the ledger is down; the batch is answered and not recorded")
            states, cut = {}, {}
        would = [adm[i].would or cut.get(i) for i in range(b)] if self.observe else []
        if self.observe:  # the rows the rule cuts are answered (and recorded: _record, pending below)
            cut = {}
        for i in cut:
            denied[i] = True
        suspect &= ~torch.tensor(denied, dtype=torch.bool)
        counted = (flagged | suspect) & ~torch.tensor(denied, dtype=torch.bool)  # what the refusal rule saw
        anonymous = torch.tensor([adm[i].anonymous and not denied[i] for i in range(b)], dtype=torch.bool)
        deceive = counted | anonymous
        out = self.policy(probs, deceive.to(probs.device))
        # every answer of a client on probation, flagged or not: DPreds can be inverted by an attacker who
        # estimates d (guardian_plugin.attacks.aware), a label cannot, so a fresh id buys only labels
        on_probation = torch.tensor([adm[i].probation and not denied[i] for i in range(b)], dtype=torch.bool)
        if bool(on_probation.any()):
            rows = on_probation.to(probs.device)
            out = out.clone()
            out[rows] = label_only(probs[rows]) if self.probation.response == "label" else dpreds(probs[rows], getattr(self.policy, "d", 0.5))
        shown = [d or w is not None for d, w in zip(denied, would)] if would else denied  # observe: would-be verdicts
        verdicts = [Verdict.REFUSED if shown[i] else Verdict.FLAGGED if counted[i] else Verdict.BENIGN for i in range(b)]
        answered = b - sum(denied)
        self.counters["queries"] += answered
        self.counters["flagged"] += int((flagged & ~torch.tensor(denied, dtype=torch.bool)).sum())
        self.counters["suspect"] += int(suspect.sum())
        self.counters["probation"] += int(on_probation.sum())
        self.counters["refused"] += b - answered
        # (client, counted as flagged, bin, a row enforce mode would not answer: observe mode's cut rows)
        pending = [] if record else [(adm[i].client, bool(counted[i]), bins[i], bool(would and would[i]))
                                     for i in live if i not in cut]
        ms = (time.perf_counter() - t0) * 1000.0
        if self.observe:  # decided, recorded, not applied: the model's own answer on every row
            self.counters["would_deny"] += sum(w is not None for w in would)
            return InspectResult(probs, verdicts, scores, ms, states, [False] * b, flagged.tolist(), [False] * b,
                                 pending, [None] * b, would,
                                 [bool(d) and w is None for d, w in zip((deceive | on_probation).tolist(), would)],
                                 [bool(p) and w is None for p, w in zip(on_probation.tolist(), would)])
        return InspectResult(out, verdicts, scores, ms, states, (deceive | on_probation).tolist(), flagged.tolist(),
                             on_probation.tolist(), pending, [cut.get(i) for i in range(b)])

    def commit(self, results: Sequence[InspectResult], admissions: Sequence[Admission]) -> dict:
        """The ledger update of answers about to be sent: the rows of ``results`` (from
        ``inspect(..., record=False)``) in one atomic update per client, and the quota holds of
        ``admissions`` made final (docs/ledger.md). Call it after the answers are built, right before
        they leave. Raises LedgerUnavailable like ``inspect``."""
        per_client: "OrderedDict[str, list]" = OrderedDict()
        for res in results:
            for c, is_flagged, b, would_cut in res.pending:
                if c is not None:
                    per_client.setdefault(c, []).append((is_flagged, b, would_cut))
        holds = holds_of(admissions)
        states = {}
        if per_client or holds:
            updates = []
            for c, rows in per_client.items():
                # observe mode: the rows enforce mode would not answer in an update of their own, so that the
                # store refuses the client at the query enforce mode would (refused_at_query)
                k = next((j for j, r in enumerate(rows) if r[2]), len(rows))
                updates += [self._update(c, [f for f, *_ in part], [b for _, b, _ in part])
                            for part in (rows[:k], rows[k:]) if part]
            try:
                recorded = self.ledger.record_many(updates, commit=holds)
            except LedgerUnavailable:
                if not self.observe:
                    raise
                log.warning("guardian: observe mode: the ledger is down; answers sent without their ledger update")
                recorded = []
            for st in recorded:
                states[st.client_id] = st
            for st in states.values():
                if crossed(st, len(per_client.get(st.client_id, ()))):
                    log.warning("guardian: client %r refused at query %d (flagged %d)", st.client_id,
                                st.refused_at_query, st.flagged)
        for res in results:
            res.states = {c: states[c] for c, *_ in res.pending if c in states}
        return states

    def _update(self, client: str, counted: Sequence[bool], bins: Sequence[Optional[int]]) -> tuple:
        """One ledger update of a client's rows: (client, queries, counted as flagged[, bin counts])."""
        nbins = self.distribution.reference.bins if self.distribution is not None else 0
        if not nbins:
            return client, len(counted), sum(map(bool, counted))
        h = [0] * nbins
        for v in bins:
            if v is not None:
                h[v] += 1
        return client, len(counted), sum(map(bool, counted)), tuple(h)

    def _count_once(self, adm: Sequence[Admission], inputs: torch.Tensor, bins: List[Optional[int]]) -> None:
        """Identical queries count once in the distribution test: a row whose client sent the very same
        served input before (within this process's last ``SEEN_CAP`` distinct pairs) gets no bin. A cached
        answer gives an attacker nothing new, and a customer who retries or re-sends one photo is not a
        distribution; near-duplicates (re-encoded, re-scaled) are distinct queries and count. Per process:
        behind N workers the same image counts at most N times, and again once it has been dropped."""
        rows = [i for i, v in enumerate(bins) if v is not None and adm[i].client is not None]
        if not rows:
            return
        x = inputs[rows].detach().cpu().contiguous()
        if x.dtype == torch.bfloat16:  # (numpy has no bfloat16)
            x = x.float()
        keys = [(adm[i].client, hashlib.blake2b(x[j].numpy().tobytes(), digest_size=12).digest())
                for j, i in enumerate(rows)]
        with self._seen_lock:
            for i, key in zip(rows, keys):
                if key in self._seen:
                    self._seen.move_to_end(key)
                    bins[i] = None
                else:
                    self._seen[key] = None
            while len(self._seen) > SEEN_CAP:
                self._seen.popitem(last=False)

    def _distribution_applies(self, inputs: torch.Tensor) -> bool:
        """Whether the distribution test applies to these inputs: at every input size once the served path
        was probed and the reference describes it (served_path); unprobed, per batch (DistributionTest.applies_to)."""
        h, w = (int(v) for v in inputs.shape[-2:])
        if self.distribution.applies_to(h, w, self.detector.spec.image.size, self.detector.spec.input.fit):
            return True
        if not self._dist_warned and not self.distribution.off:
            self._dist_warned = True
            log.warning("guardian: distribution test not applied to %dx%d inputs: its reference was measured on %s "
                        "inputs and the detector resamples these (build the reference on the served path, or set "
                        "distribution.enabled: true; docs/refusal-rule.md)", h, w,
                        ", ".join("x".join(map(str, v)) for v in self.distribution.reference.input_sizes
                                  or [[self.detector.spec.image.size] * 2]))
        return False

    def served_path(self, height: int, width: int) -> None:
        """Adapters that probed their served path at load: it gives the model ``height`` x ``width``
        inputs for an image of the detector's size. ``distribution: {enabled: auto}`` switches the test
        off, with one warning, when its reference was measured at another size (a resizing handler in
        front of a reference built at the detector's size); ``enabled: true`` applies it and warns."""
        if self.distribution is None:
            return
        native = self.detector.spec.image.size
        self.distribution = self.distribution.for_served_path(height, width, native)
        why = self.distribution.mismatch(height, width, native)
        if self.distribution.off:
            log.warning("guardian: distribution test off (enabled: auto): %s", why)
        elif why:
            log.warning("guardian: distribution test applied (enabled: true) although %s", why)

    def _record(self, adm: Sequence[Admission], live: Sequence[int], flagged: torch.Tensor, suspect: torch.Tensor,
                bins: Sequence[Optional[int]], holds: Sequence[tuple] = ()):
        """The ledger updates of the answered rows, applied so that the rule acts row by row.

        Each identified client's rows are recorded in order, in segments: :func:`first_crossing`
        predicts, from the client's state, the row at which the rule (or the flagged quota) would act,
        and a segment ends there (or after ``distribution.block`` rows, so that a block that completes
        and fails the distribution test makes the client's later rows suspect, as it would between
        requests). The store decides: when its state after a segment denies the client, the client's
        remaining rows are cut; when it does not (the prediction is conservative: it assumes the rows
        leaving a full sliding window were unflagged), recording goes on. One ``record_many`` call per
        round for every client at once; a client that sends one row per request costs one round, as
        before. ``holds``: the (client, token) quota holds committed with the first update. Returns
        (states after the batch by client id, {row: Denial} of the rows cut)."""
        rule = self.ledger.rule
        per_client = self._rows_by_client(adm, live)
        if not per_client:
            if holds:
                self.ledger.record_many([], commit=holds)
            return {}, {}
        seg_cap = self.distribution.block if self.distribution is not None else None
        counted = (flagged | suspect).tolist()
        known = self._known_states(adm, per_client)
        pending = {c: list(rows) for c, rows in per_client.items()}
        states: Dict[str, object] = {}
        cut: Dict[int, Denial] = {}
        start_q = {c: known[c].queries for c in per_client}
        stopped = set()
        while pending:
            plan, refuse_at = {}, {}
            for c, rows in pending.items():
                # observe mode: a client already stopped has its rows recorded all the same, in one segment
                k = None if self.observe and (known[c].denied or c in stopped) else \
                    first_crossing(rule, known[c], [counted[i] for i in rows])
                n = len(rows) if k is None else k[0] + 1
                if k is not None and k[1] == "rule":
                    # the cumulative rule, predicted exactly: crossed inside a request of several rows (before
                    # its last one), that request is not answered, so it is not counted either: the rows
                    # before it are recorded and the client is refused as it stands
                    request = adm[rows[k[0]]]
                    if any(adm[i] is request for i in rows[k[0] + 1:]):
                        n = refuse_at[c] = next(j for j, i in enumerate(rows) if adm[i] is request)
                if seg_cap:
                    n = min(n, seg_cap)
                plan[c] = rows[:n]
            updates = [self._update(c, [counted[i] for i in rows], [bins[i] for i in rows])
                       for c, rows in plan.items() if rows]
            commit, holds = holds, ()
            recorded = {st.client_id: st for st in self.ledger.record_many(updates, commit=commit)}
            for c in plan:
                st = recorded.get(c) or known[c]
                if refuse_at.get(c) == len(plan[c]) and not st.denied:  # reached the request that crosses
                    st = self.ledger.refuse(c)
                rest = pending[c][len(plan[c]):]
                states[c] = st
                stop = self._stop(st)
                if stop is None and rest and self.distribution is not None and not adm[rest[0]].suspect \
                        and st.dist_counts != known[c].dist_counts and self.distribution.fails(st.dist_counts):
                    for i in rest:  # a block completed in this batch and failed: the later rows are suspect
                        suspect[i] = True
                        counted[i] = True
                known[c] = st
                if stop is not None:
                    for i in rest:
                        cut.setdefault(i, stop)
                    stopped.add(c)
                    if not self.observe:  # observe mode records the cut rows too (answered all the same)
                        rest = []
                if rest:
                    pending[c] = rest
                else:
                    del pending[c]
                    if crossed(st, st.queries - start_q[c]):
                        log.warning("guardian: client %r refused at query %d (flagged %d)", c, st.refused_at_query,
                                    st.flagged)
        whole_requests(adm, per_client, cut)
        return states, cut

    def _plan(self, adm: Sequence[Admission], live: Sequence[int], counted: Sequence[bool]) -> Dict[int, Denial]:
        """The rows cut (:meth:`_record`) as predicted from the clients' states at admission, without
        writing the ledger (``inspect(record=False)``): exact for the cumulative rule and the flagged
        quota, conservative for the sliding window."""
        per_client = self._rows_by_client(adm, live)
        known = self._known_states(adm, per_client)
        cut: Dict[int, Denial] = {}
        rule = self.ledger.rule
        for c, rows in per_client.items():
            k = first_crossing(rule, known[c], [counted[i] for i in rows])
            if k is not None and k[0] + 1 < len(rows):
                denial = quota_exceeded(rule.retry_after(time.time())) if k[1] == "quota" else REFUSED
                for i in rows[k[0] + 1:]:
                    cut[i] = denial
        whole_requests(adm, per_client, cut)
        return cut

    @staticmethod
    def _rows_by_client(adm: Sequence[Admission], live: Sequence[int]) -> "OrderedDict[str, List[int]]":
        per_client: "OrderedDict[str, List[int]]" = OrderedDict()
        for i in live:
            if adm[i].client is not None:  # anonymous: no client to count (guardian_plugin.identity)
                per_client.setdefault(adm[i].client, []).append(i)
        return per_client

    def _known_states(self, adm: Sequence[Admission], per_client) -> dict:
        """Each client's latest state that admission saw (its rows may come from several admissions);
        plain client ids (Python use): read from the ledger."""
        known = {}
        for c, rows in per_client.items():
            seen = [adm[i].state for i in rows if adm[i].state is not None]
            known[c] = max(seen, key=lambda st: st.queries) if seen else self._read_state(c)
        return known

    def _read_state(self, client: str):
        """A client's state read from the ledger; with the store down, a blank one (the prediction then
        says nothing, and recording meets the store's failure as it always did)."""
        try:
            return self.ledger.get(client)
        except LedgerUnavailable:
            from guardian_plugin.ledger.base import ClientState

            return ClientState(client)

    def _stop(self, st) -> Optional[Denial]:
        """Why a client's further rows in a batch are not answered after the store returned ``st``."""
        if st.blocked:
            return BLOCKED
        if st.refused:
            return REFUSED
        rule = self.ledger.rule
        if rule.flagged_quota:
            t = time.time()
            if st.period_counts(rule, t)[1] >= rule.flagged_quota:
                return quota_exceeded(rule.retry_after(t))
        return None


def whole_requests(adm: Sequence[Admission], per_client, cut: Dict[int, Denial]) -> None:
    """A request (rows sharing one Admission object) that a client crossed a rule inside, before its
    last row, is not answered at all: its other rows join ``cut``."""
    for rows in per_client.values():
        cut_rows = [i for i in rows if i in cut]
        if not cut_rows:
            continue
        denial, requests = cut[cut_rows[0]], {id(adm[j]) for j in cut_rows}  # one set: linear in the rows
        for i in rows:
            if i not in cut and id(adm[i]) in requests:
                cut[i] = denial


def holds_of(admissions: Sequence[Admission]) -> List[tuple]:
    """The (client, hold token) pairs of the admissions' quota holds, each once."""
    return list(dict.fromkeys((a.client, h) for a in admissions if isinstance(a, Admission) and a.client
                              for h in a.holds))


def first_crossing(rule, state, counted: Sequence[bool]) -> Optional[Tuple[int, str]]:
    """The index of the first of ``counted`` (one bool per row, in order: counted as flagged) after which
    ``rule`` would deny a client that starts in ``state``, and why (``rule``: the cumulative refusal
    rule; ``window``: the sliding window; ``quota``: the flagged quota); None when it would not within
    these rows. The sliding window is predicted
    conservatively (rows leaving a full window are taken to have been unflagged), so the prediction is
    never later than the store's own decision."""
    q, f = state.queries, state.flagged
    wl = int(state.extra.get("window", 0)) if rule.window else 0
    wf = int(state.extra.get("window_flagged", 0)) if rule.window else 0
    pf = state.period_counts(rule, time.time())[1] if rule.flagged_quota else 0
    for k, c in enumerate(counted):
        q += 1
        f += int(c)
        if rule.window:
            wl = min(wl + 1, rule.window)
            wf = min(wf + int(c), wl)
            if rule.window_triggered("1" * wf + "0" * (wl - wf)):
                return k, "window"
        if rule.triggered(q, f):
            return k, "rule"
        if rule.flagged_quota:
            pf += int(c)
            if pf >= rule.flagged_quota:
                return k, "quota"
    return None


def distribution_test(cfg: GuardConfig) -> Optional[DistributionTest]:
    """The config's distribution test: on with the artifact's reference.json (``enabled: auto``; an adapter
    that probes its served path may switch it off there, Guardian.served_path)."""
    d = cfg.distribution
    if d.enabled is False:
        return None
    ref = load_reference(cfg.detector)
    if ref is None:
        if d.enabled is True:
            raise ConfigError(f"distribution.enabled is true but {cfg.detector} has no reference.json "
                              "(guardian reference --config TRAIN_CONFIG --detector DIR)")
        return None
    return DistributionTest(ref, d.block, d.max_false, d.horizon, auto=d.enabled == "auto")
