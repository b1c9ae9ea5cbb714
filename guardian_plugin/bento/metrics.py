"""The guard's Prometheus metrics (``guardian_*``), shown on BentoML's ``/metrics``."""

from __future__ import annotations

import threading
import typing as t

_METRICS: dict = {}
_METRICS_LOCK = threading.Lock()


def _metric(kind: str, name: str, doc: str, labels: t.Sequence[str], **kw):
    """prometheus_client metrics, created once per process on first use: BentoML sets
    PROMETHEUS_MULTIPROC_DIR in each worker before the service starts, and prometheus_client must be
    imported after that to write the multiprocess files /metrics aggregates."""
    with _METRICS_LOCK:
        m = _METRICS.get(name)
        if m is None:
            import prometheus_client

            m = getattr(prometheus_client, kind)(name, doc, list(labels), **kw)
            _METRICS[name] = m
        return m


class _Metrics:
    def __init__(self, service: str):
        self.service = service
        lab = ["service", "api"]
        self.queries = _metric("Counter", "guardian_queries", "Images inspected by Model-Guardian", lab)
        self.flagged = _metric("Counter", "guardian_flagged", "Images flagged as synthetic (answered with DPreds)", lab)
        self.crossed = _metric("Counter", "guardian_clients_refused",
                               "Clients that crossed the refusal rule in this service", ["service"])
        self.refused = _metric("Counter", "guardian_refused_requests",
                               "Requests answered 403 because the client is refused", ["service"])
        self.quota = _metric("Counter", "guardian_quota_exceeded_requests",
                             "Requests answered 429 because the client's quota for the period is used up", ["service"])
        self.missing = _metric("Counter", "guardian_missing_identity_requests",
                               "Requests answered 401: no identity, an untrusted gateway, or an API key "
                               "not issued or revoked", ["service"])
        # observe mode (docs/rollout.md): what enforce mode would have done, nothing of it applied
        self.would_refuse = _metric("Counter", "guardian_would_refuse_requests",
                                    "Observe mode: images served that enforce mode would answer 403 (refused or blocked)",
                                    ["service"])
        self.would_quota = _metric("Counter", "guardian_would_quota_exceeded_requests",
                                   "Observe mode: images served that enforce mode would answer 429 (a quota)", ["service"])
        self.would_deny = _metric("Counter", "guardian_would_deny_requests",
                                  "Observe mode: requests served that enforce mode would deny otherwise (401/400 "
                                  "identity, 503 store down)", ["service"])
        self.would_dpreds = _metric("Counter", "guardian_would_dpreds",
                                    "Observe mode: answers enforce mode would give as DPreds", lab)
        self.would_probation = _metric("Counter", "guardian_would_probation",
                                       "Observe mode: answers enforce mode would give as the probation response", lab)
        self.guard_s = _metric("Histogram", "guardian_guard_seconds",
                               "Time the guard adds per batch (gradient, detector, ledger, response)", lab,
                               buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5))

    def inspected(self, api: str, n: int, n_flagged: int, newly_refused: int, seconds: float):
        self.queries.labels(self.service, api).inc(n)
        if n_flagged:
            self.flagged.labels(self.service, api).inc(n_flagged)
        if newly_refused:
            self.crossed.labels(self.service).inc(newly_refused)
        self.guard_s.labels(self.service, api).observe(seconds)

    def would(self, denial) -> None:
        """Observe mode: one request or image served that enforce mode would have answered ``denial``."""
        c = self.would_refuse if denial.status == 403 else self.would_quota if denial.status == 429 else self.would_deny
        c.labels(self.service).inc()

    def would_answers(self, api: str, dpreds: int, probation: int) -> None:
        if dpreds:
            self.would_dpreds.labels(self.service, api).inc(dpreds)
        if probation:
            self.would_probation.labels(self.service, api).inc(probation)
