"""What checking issued API keys costs on the request path, side by side with client-chosen ids.

    .venv/bin/python benchmarks/key_overhead.py [--seconds 2] [--rounds 5] [--revoked 1000]

Measured in one process, modes interleaved round by round (A B C A B C ...) so a busy machine slows
them alike; the median round is reported:

- ``identity``: Identity.client_id alone, per request (headers -> ledger client id);
- ``admit_batch``: Guardian.admit_batch on batches of 8 requests of 8 distinct clients, the ledger a
  real SQLite file (the default store; the reservation in it dominates), as a TorchServe worker calls it.

Modes: ``client-id`` (``headers: [X-Client-Id]``), ``keys`` (``api_key_header: X-Api-Key``: format
check, HMAC-SHA256 in constant time, revoked-set lookup; ``--revoked`` keys revoked in the store; the set
read again every 5 s, the default) and ``keys, refresh every request`` (``key_refresh_s: 0``: the revoked
set read from the SQLite store on every request, the worst case). Writes
benchmarks/results/key_overhead.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.fuzz_requests import write_report  # noqa: E402
from guardian_plugin.config import IdentityConfig  # noqa: E402
from guardian_plugin.detector import load_detector  # noqa: E402
from guardian_plugin.guardian import Guardian  # noqa: E402
from guardian_plugin.identity import Identity  # noqa: E402
from guardian_plugin.keys import open_key_store  # noqa: E402
from guardian_plugin.ledger import RefusalRule, open_ledger  # noqa: E402

OUT = os.path.join(ROOT, "benchmarks", "results", "key_overhead.json")
DETECTOR = os.path.join(ROOT, "examples", "mnist", "artifacts", "detector")
SECRET = "benchmark-key-secret-0123456789"
CLIENTS, BATCH = 64, 8


def setup(work: str, revoked: int):
    """The modes: name -> (Guardian, request headers of CLIENTS clients)."""
    uri = f"sqlite:///{work}/ledger.db"
    store = open_key_store(uri, "bench")
    keys = [store.issue(SECRET, "bench", f"client-{i}")[0] for i in range(CLIENTS)]
    for i in range(revoked):
        store.issue(SECRET, "bench", f"gone-{i}")
        store.revoke(f"gone-{i}", time.time())
    store.close()
    detector = load_detector(DETECTOR)
    rule = RefusalRule(tau=10**9, rho=0.99, quota=0, flagged_quota=0)
    modes = {
        "client-id": (IdentityConfig(), [{"X-Client-Id": f"client-{i}"} for i in range(CLIENTS)]),
        "keys": (IdentityConfig(api_key_header="X-Api-Key", key_secret=SECRET),
                 [{"X-Api-Key": k} for k in keys]),
        "keys, refresh every request": (IdentityConfig(api_key_header="X-Api-Key", key_secret=SECRET,
                                                       key_refresh_s=0), [{"X-Api-Key": k} for k in keys]),
    }
    out = {}
    for name, (cfg, headers) in modes.items():
        g = Guardian(detector, open_ledger(uri, rule, "bench"), identity=Identity(cfg))
        assert all(a.ok for a in g.admit_batch(headers)), name  # every key accepted (and the clients known)
        out[name] = (g, headers)
    return out


def rate(fn, headers, seconds: float, per_call: int) -> float:
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn(headers[(n * per_call) % CLIENTS:(n * per_call) % CLIENTS + per_call])
        n += 1
    return n * per_call / (time.perf_counter() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=2.0, help="per mode and round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--revoked", type=int, default=1000, help="keys revoked in the store (the set each process keeps)")
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args(argv)
    modes = setup(tempfile.mkdtemp(prefix="guardian-keys-"), args.revoked)
    benches = {
        "identity": lambda g: (lambda hs: [g.identity.client_id(h) for h in hs], 1),
        "admit_batch": lambda g: (g.admit_batch, BATCH),
    }
    rounds = {b: {m: [] for m in modes} for b in benches}
    for _ in range(args.rounds):
        for b, make in benches.items():
            for m, (g, headers) in modes.items():
                fn, per_call = make(g)
                rounds[b][m].append(rate(fn, headers, args.seconds, per_call))
    results = {}
    for b in benches:
        base = statistics.median(rounds[b]["client-id"])
        results[b] = {m: {"requests_per_s": round(statistics.median(r)), "rounds": [round(x) for x in r],
                          "us_per_request": round(1e6 / statistics.median(r), 2),
                          "vs_client_id": round(statistics.median(r) / base, 3)} for m, r in rounds[b].items()}
        print(f"\n{b} (requests/s, median of {args.rounds} rounds of {args.seconds} s):")
        for m, r in results[b].items():
            print(f"  {m:<28} {r['requests_per_s']:>9}  {r['us_per_request']:>8} us/request  "
                  f"x{r['vs_client_id']} of client-id")
    return write_report(args.out, {"benchmark": "key_overhead", "seconds": args.seconds, "rounds": args.rounds,
                                   "revoked_keys": args.revoked, "batch": BATCH, "clients": CLIENTS,
                                   "ledger": "sqlite file", "results": results}, [], "done")


if __name__ == "__main__":
    sys.exit(main())
