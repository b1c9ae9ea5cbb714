"""No phantom counts: a REAL TorchServe 0.12 with batching (2 workers, one SQLite ledger), six clients
sending at once, and one worker process SIGKILLed in the middle of a batch twice (during inference, and
during postprocess), TorchServe restarting it. Once the quota holds' lease (3 s here) has passed, every
client's ledger counts -- queries and the quota period's queries -- equal the 200 answers it received:
a killed batch leaves neither its queries nor its reservations counted (docs/ledger.md "Holds").

The handler is the example's, slowed (tests/data/slow_mnist_handler.py) so that a batch is in flight
long enough to be killed in it; it marks the stage it is in with a file named after its process id.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import sys
import threading
import time

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from examples.mnist import serving as ex  # noqa: E402
from guardian_plugin.devserver.torchserve import build_archive  # noqa: E402
from guardian_plugin.handlers.archive import protect  # noqa: E402
from guardian_plugin.ledger import open_ledger  # noqa: E402
from guardian_plugin.ledger.base import RefusalRule  # noqa: E402
from serving_fixtures import start_torchserve  # noqa: E402

SLOW_HANDLER = os.path.join(ROOT, "tests", "data", "slow_mnist_handler.py")
CLIENTS, PER_CLIENT, QUOTA, LEASE_S = 6, 6, 1000, 3
WORKERS, BATCH, DELAY_MS, STAGE_S = 2, 4, 50, 0.25


def _wait_marker(markers: str, stage: str, timeout_s: float):
    """The pid of a worker that entered ``stage`` less than half a stage ago (so it is surely still in
    it when killed, not past its ledger commit), or None after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for path in glob.glob(os.path.join(markers, f"{stage}-*")):
            try:
                young = time.time() - os.path.getmtime(path) < STAGE_S / 2
            except FileNotFoundError:  # the stage just ended
                continue
            if young:
                return int(path.rsplit("-", 1)[1])
        time.sleep(0.005)
    return None


def test_a_worker_killed_mid_batch_leaves_no_count(tmp_path):
    for p in (ex.VICTIM_TS, os.path.join(ex.DETECTOR, "detector.yaml")):
        assert os.path.exists(p), f"{p} missing: regenerate the example with `make train-example`"
    markers, store = tmp_path / "markers", tmp_path / "store"
    markers.mkdir()
    slow = tmp_path / "slow.json"
    slow.write_text(json.dumps({"dir": str(markers), "seconds": STAGE_S}))
    ledger = f"sqlite:///{tmp_path}/state/ledger.db"
    cfg = tmp_path / "guard.yaml"
    cfg.write_text(yaml.safe_dump({"ledger": ledger, "namespace": "kill", "identity": {"headers": ["X-Client-Id"]},
                                   "rule": {"tau": 100000},
                                   "quota": {"queries": QUOTA, "period": "1d", "lease": f"{LEASE_S}s"}}))
    t_build = time.monotonic()
    soft = build_archive("slow", ex.VICTIM_TS, SLOW_HANDLER, str(store), extra_files=[ex.MNIST_HANDLER, str(slow)])
    protect(soft, ex.DETECTOR, os.path.join(store, "slow_g.mar"), config=str(cfg))
    ts = start_torchserve(str(store), str(tmp_path / "server"), {"slow_g": WORKERS}, BATCH, DELAY_MS)
    t_up = time.monotonic()
    try:
        digits, _ = ex.real_digits(PER_CLIENT)
        clients = [f"k-{c}" for c in range(CLIENTS)]
        codes = {c: [] for c in clients}
        done = threading.Event()

        def send(c):
            for d in digits:
                codes[c].append(ts.predict("slow_g", d, {"X-Client-Id": c}).status_code)

        killed = []

        def killer():
            for stage in ("infer", "post"):  # before the old ledger write, and after it
                pid = _wait_marker(str(markers), stage, 30)
                if pid is None or done.is_set():
                    return
                os.kill(pid, signal.SIGKILL)
                killed.append((stage, pid))
                time.sleep(0.5)

        threads = [threading.Thread(target=send, args=(c,)) for c in clients]
        k = threading.Thread(target=killer)
        t0 = time.monotonic()
        k.start()
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        done.set()
        k.join(35)
        took = time.monotonic() - t0
        assert [s for s, _ in killed] == ["infer", "post"], (killed, ts.log_tail(40))
        failed = sum(1 for c in clients for s in codes[c] if s != 200)
        assert failed >= 2, (codes, "the killed batches' requests must have failed")  # the test kills something
        assert all(s in (200, 500, 503, 507) for c in clients for s in codes[c]), codes
        time.sleep(LEASE_S + 0.5)
        led = open_ledger(ledger, RefusalRule(tau=100000, quota=QUOTA, quota_lease_s=LEASE_S), "kill")
        got = {c: (led.get(c).queries, led.get(c).period_queries) for c in clients}
        answered = {c: codes[c].count(200) for c in clients}
        statuses = sorted({x for c in clients for x in codes[c]})
        print(f"archive+server {t_up - t_build:.1f} s, sent for {took:.1f} s, killed {killed}, failed {failed} "
              f"(statuses {statuses}); answered {answered}, ledger {got}")
        assert got == {c: (answered[c], answered[c]) for c in clients}, (answered, got)
    finally:
        ts.stop()
