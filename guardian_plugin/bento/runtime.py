"""Per-process state of a guarded service: the Guardian, the metrics; the request's admission
(Guardian.admit) and the guard step (Guardian.inspect) on one (batched) call."""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import replace
import typing as t

import torch

from guardian_plugin.bento.conversion import _as_input_tensor, _as_prob_tensor
from guardian_plugin.bento.metrics import _Metrics
from guardian_plugin.inputs import DEFAULT_MAX_PIXELS
from guardian_plugin.bento.middleware import STATE_ADMISSION, denial_exception
from guardian_plugin.errors import LedgerUnavailable
from guardian_plugin.responses import UNAVAILABLE, Admission, label_only

if t.TYPE_CHECKING:
    from guardian_plugin.bento.decorator import GuardSettings

log = logging.getLogger("guardian_plugin.bento")

CONFIG_ENV = "GUARDIAN_CONFIG"  # a guard YAML that replaces the decorator's config (ops / tests)
LEDGER_ENV = "GUARDIAN_LEDGER"  # a ledger URI that replaces the config's (e.g. one file for a deployment)
STATE_ROWS = "guardian_rows"  # the rows a list request's admission covers (admit_rows)


class _Runtime:
    """Per-process state: the Guardian (detector + ledger), the identity rules, the metrics."""

    def __init__(self, settings: GuardSettings):
        from guardian_plugin.guardian import Guardian

        self.pid = os.getpid()
        cfg = settings.resolve_config()
        g = settings.guardian
        if g is not None and os.environ.get(CONFIG_ENV) is None:
            self.guardian = g() if callable(g) and not isinstance(g, Guardian) else g
        elif cfg is not None:
            self.guardian = Guardian.from_config(cfg)
        else:
            raise ValueError("guard(...) needs a config (path, dict or GuardConfig) or a guardian")
        self.max_image_pixels = cfg.max_image_pixels if cfg is not None else DEFAULT_MAX_PIXELS
        self.instance = None  # this worker's service instance (set by the startup hook)
        self.metrics = _Metrics(settings.service_name or "unknown")
        self._lock = threading.Lock()  # the detector's autograd pass is not shared across threads
        log.info("guardian: service %s protected (pid %d, ledger %s)", settings.service_name, self.pid,
                 type(self.guardian.ledger).__name__)

    # identity and refusal, for one request ------------------------------------------------------
    def check_request(self, request) -> Admission:
        """Guardian.admit for one HTTP request, once per request (the middleware's answer is kept in the
        request's state for the API method)."""
        state = request.scope.setdefault("state", {})
        adm = state.get(STATE_ADMISSION)
        if adm is None:
            adm = self.guardian.admit(request.headers)
            self._count_denial(adm)
            state[STATE_ADMISSION] = adm
        return adm

    def admit_rows(self, request, adm: Admission, rows: int) -> Admission:
        """The admission of a request that turned out to carry ``rows`` images (a list input): its
        admission reserved one query of the client's quota, so the other ``rows - 1`` are reserved now,
        once per request. Should the quota not cover them all, the request is answered 429 as a whole
        (the queries granted meanwhile are spent, as any granted query is) and that denial replaces the
        request's admission, so its error answer carries the 429 body and Retry-After (middleware)."""
        if adm.denial is not None or adm.client is None or rows <= 1 or request is None:
            return adm
        state = request.scope.setdefault("state", {})
        if state.get(STATE_ROWS):
            return state.get(STATE_ADMISSION, adm)
        state[STATE_ROWS] = rows
        more = self.guardian.admit_clients([adm.client] * (rows - 1))
        denial = next((a.denial for a in more if a.denial is not None), None)
        holds = tuple(dict.fromkeys(adm.holds + tuple(h for a in more for h in a.holds)))
        would = next((a.would for a in more if a.would is not None), None)  # observe mode
        if would is not None and adm.would is None:
            adm = replace(adm, would=would)
            self._count_denial(adm)
        if denial is not None:
            # the 429 is this request's answer: what was granted for it is spent (its holds committed)
            try:
                self.guardian.commit([], [replace(adm, holds=holds)])
            except LedgerUnavailable:  # not committed: the holds lapse after their lease
                pass
            adm = Admission(client=adm.client, denial=denial)
            self._count_denial(adm)
        else:  # committed with the request's answer (Guardian.inspect)
            adm = replace(adm, holds=holds)
        state[STATE_ADMISSION] = adm
        return adm

    def answered_error(self, adm: Admission) -> None:
        """An error answer (400 bad input, 500) of a request with granted queries has been sent: its
        quota holds are committed, so the grants stay spent as for TorchServe's 400s (docs/ledger.md)."""
        if adm.holds and adm.denial is None:
            try:
                self.guardian.commit([], [adm])
            except LedgerUnavailable:  # not committed: the holds lapse after their lease
                pass

    def _count_denial(self, adm: Admission) -> None:
        if adm.would is not None:  # observe mode: served, counted as what enforce mode would have done
            self.metrics.would(adm.would)
        if adm.denial is not None:
            counter = {401: self.metrics.missing, 403: self.metrics.refused,
                       429: self.metrics.quota}.get(adm.denial.status)
            if counter is not None:
                counter.labels(self.metrics.service).inc()

    def local_admission(self) -> Admission:
        """A call made in Python (``svc.method(...)``, no HTTP request): counted as the anonymous id."""
        return Admission(client=self.guardian.identity.cfg.anonymous_id)

    # the guard step, for one (batched) call ------------------------------------------------------
    def guard(self, api: str, inputs, probs, admissions: t.Sequence[Admission]):
        t0 = time.perf_counter()
        p, restore = _as_prob_tensor(probs)
        x = _as_input_tensor(inputs)
        if x.shape[0] != p.shape[0] or len(admissions) != p.shape[0]:
            raise ValueError(f"guarded API {api!r}: preprocess gave {x.shape[0]} rows, the method returned "
                             f"{p.shape[0]} probability rows for {len(admissions)} requests' rows")
        with self._lock:
            try:
                res = self.guardian.inspect(x, p, list(admissions))
            except LedgerUnavailable:  # ledger_failure: closed -> 503 for the requests of this call
                raise denial_exception(UNAVAILABLE) from None
        cut = [d is not None for d in res.cut]
        n_flag = sum(f and not c for f, c in zip(res.flagged, cut))
        self.metrics.inspected(api, p.shape[0] - sum(cut), n_flag, res.newly_refused([a.client for a in admissions]),
                               time.perf_counter() - t0)
        if res.would:  # observe mode: the rows the rule would have cut (admission's denials: _count_denial)
            for w, a in zip(res.would, admissions):
                if w is not None and a.would is None:
                    self.metrics.would(w)
            self.metrics.would_answers(api, sum(d and not q for d, q in zip(res.would_deceived, res.would_probation)),
                                       sum(res.would_probation))
        if any(cut):
            if all(cut):  # the call holds only requests the client crossed the rule in: answered 403 / 429
                raise denial_exception(next(d for d in res.cut if d is not None))
            # adaptive batching joined them to other clients' requests, which must not fail with them, and
            # BentoML answers a joined batch as a whole: their rows get the top-1 label only
            out = res.probs.clone()
            rows = torch.tensor(cut, dtype=torch.bool)
            out[rows] = label_only(p[rows])
            return restore(out)
        if not any(res.deceived):
            return probs  # the very object the method returned: benign answers are untouched
        return restore(res.probs)
