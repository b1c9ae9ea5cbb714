"""Per-process state of a guarded service: the Guardian, the identity rules, the metrics; the
request check (401/403) and the guard step on one (batched) call."""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
import typing as t

from guardian_plugin.bento.conversion import _as_input_tensor, _as_prob_tensor
from guardian_plugin.bento.metrics import _Metrics
from guardian_plugin.identity import MissingIdentity, client_id

if t.TYPE_CHECKING:
    from guardian_plugin.bento.decorator import GuardSettings

log = logging.getLogger("guardian_plugin.bento")

CONFIG_ENV = "GUARDIAN_CONFIG"  # a guard YAML that replaces the decorator's config (ops / tests)
LEDGER_ENV = "GUARDIAN_LEDGER"  # a ledger URI that replaces the config's (e.g. one file for a deployment)
STATE_CLIENT = "guardian_client_id"
STATE_CHECKED = "guardian_checked"


class _Runtime:
    """Per-process state: the Guardian (detector + ledger), the identity rules, the metrics."""

    def __init__(self, settings: GuardSettings):
        from guardian_plugin.config import IdentityConfig
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
        self.identity = cfg.identity if cfg is not None else IdentityConfig()
        self.metrics = _Metrics(settings.service_name or "unknown")
        self._lock = threading.Lock()  # the detector's autograd pass is not shared across threads
        log.info("guardian: service %s protected (pid %d, ledger %s)", settings.service_name, self.pid,
                 type(self.guardian.ledger).__name__)

    # identity and refusal, for one request ------------------------------------------------------
    def check_request(self, request) -> t.Tuple[t.Optional[str], t.Optional[t.Tuple[int, dict]]]:
        """(client id, None) or (client id or None, (status, JSON body)) for a request to refuse."""
        state = request.scope.setdefault("state", {})
        if state.get(STATE_CHECKED):
            return state.get(STATE_CLIENT), None
        try:
            cid = client_id(request.headers, self.identity)
        except MissingIdentity as e:
            self.metrics.missing.labels(self.metrics.service).inc()
            return None, (401, {"error": "missing client identity", "detail": str(e)})
        st = self.guardian.ledger.get(cid)
        if st.denied:
            self.metrics.refused.labels(self.metrics.service).inc()
            reason = ("blocked by an operator" if st.blocked else
                      "too many of this client's queries were flagged as synthetic (data-free model stealing)")
            return cid, (403, {"error": "refused", "detail": f"Model-Guardian refuses this client: {reason}",
                               "client_id": cid})
        state[STATE_CLIENT] = cid
        state[STATE_CHECKED] = True
        return cid, None

    # the guard step, for one (batched) call ------------------------------------------------------
    def guard(self, api: str, inputs, probs, client_ids: t.Sequence[str]):
        t0 = time.perf_counter()
        p, restore = _as_prob_tensor(probs)
        x = _as_input_tensor(inputs)
        if x.shape[0] != p.shape[0] or len(client_ids) != p.shape[0]:
            raise ValueError(f"guarded API {api!r}: preprocess gave {x.shape[0]} rows, the method returned "
                             f"{p.shape[0]} probability rows for {len(client_ids)} requests' rows")
        with self._lock:
            res = self.guardian.inspect(x, p, list(client_ids), refused=[False] * p.shape[0])
        rows = collections.Counter(client_ids)
        newly = sum(1 for cid, s in res.states.items()  # clients that crossed the rule in this call
                    if s.refused and s.refused_at_query is not None and s.refused_at_query > s.queries - rows[cid])
        n_flag = sum(res.flagged)
        self.metrics.inspected(api, p.shape[0], n_flag, newly, time.perf_counter() - t0)
        if n_flag == 0:
            return probs  # the very object the method returned: benign answers are untouched
        return restore(res.probs)
