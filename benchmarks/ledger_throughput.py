"""Ledger throughput: P processes x N updates on ONE client (the worst case: every update contends for
the same row/key), for SQLite and Redis. Checks the totals are exact and prints updates/s.

    .venv/bin/python benchmarks/ledger_throughput.py                  # 4 x 10,000, both backends
    .venv/bin/python benchmarks/ledger_throughput.py --redis redis://127.0.0.1:6379/0

Without --redis it starts its own redis-server three times: without
persistence; with the append-only file fsynced once a second (``appendfsync everysec``: an acknowledged
count survives a crash of redis-server, not of the machine); and fsynced on every write
(``appendfsync always``: survives both). Writes benchmarks/results/ledger_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
import uuid

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from guardian_plugin.ledger import open_ledger  # noqa: E402
from guardian_plugin.ledger.base import RefusalRule  # noqa: E402
from guardian_plugin.devserver.redis import RedisServer  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "ledger_throughput.json")


def _worker(uri, ns, n, flag_every, tau, start_evt, out):
    led = open_ledger(uri, RefusalRule(tau=tau, rho=0.5), ns)
    led.get("warm-up")  # connect / open before the clock starts
    start_evt.wait()
    t0 = time.perf_counter()
    for i in range(n):
        led.record("one-client", 1, int(i % flag_every == 0))
    out.put((time.perf_counter() - t0, time.time()))
    led.close()


def run_backend(name, uri, procs, n, flag_every, tau):
    ns = f"bench-{uuid.uuid4().hex[:8]}"
    ctx = mp.get_context("spawn")
    start_evt, out = ctx.Event(), ctx.Queue()
    ps = [ctx.Process(target=_worker, args=(uri, ns, n, flag_every, tau, start_evt, out)) for _ in range(procs)]
    for p in ps:
        p.start()
    time.sleep(2.0)  # every worker imported and connected
    t_start = time.time()
    start_evt.set()
    results = [out.get(timeout=1800) for _ in ps]
    for p in ps:
        p.join(60)
        if p.exitcode != 0:
            raise SystemExit(f"{name}: a worker failed (exit {p.exitcode})")
    wall = max(r[1] for r in results) - t_start
    s = open_ledger(uri, RefusalRule(tau=tau, rho=0.5), ns).get("one-client")
    expect_q = procs * n
    expect_f = procs * sum(1 for i in range(n) if i % flag_every == 0)
    exact = (s.queries, s.flagged) == (expect_q, expect_f)
    row = {
        "backend": name, "uri": uri.split("?")[0], "processes": procs, "updates_per_process": n,
        "total_updates": expect_q, "wall_s": round(wall, 3), "updates_per_s": round(expect_q / wall, 1),
        "per_process_updates_per_s": [round(n / r[0], 1) for r in results],
        "store_queries": s.queries, "store_flagged": s.flagged, "expected_flagged": expect_f, "exact": exact,
        "refused_at_query": s.refused_at_query,
    }
    print(f"{name:<28} {expect_q:>7} updates  {wall:7.2f} s  {row['updates_per_s']:>9.1f} updates/s  "
          f"totals {'EXACT' if exact else 'WRONG'} ({s.queries}/{s.flagged})", flush=True)
    if not exact:
        raise SystemExit(f"{name}: totals wrong: store {s.queries}/{s.flagged}, expected {expect_q}/{expect_f}")
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--processes", type=int, default=4)
    ap.add_argument("--updates", type=int, default=10_000, help="updates per process")
    ap.add_argument("--flag-every", type=int, default=3, help="every k-th update is a flagged query")
    ap.add_argument("--redis", default=None,
                    help="use this Redis instead of starting redis-server (persistence as that server has it)")
    ap.add_argument("--backends", default="sqlite,redis,redis-aof-everysec,redis-aof-always")
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args(argv)
    tau = 1000  # the refusal decision runs inside every update, as in production
    rows = []
    for b in args.backends.split(","):
        if b == "sqlite":
            with tempfile.TemporaryDirectory() as d:
                rows.append(run_backend("sqlite (WAL)", f"sqlite:///{d}/ledger.db", args.processes, args.updates,
                                        args.flag_every, tau))
        elif b == "redis" and args.redis:
            rows.append(run_backend("redis (given server)", args.redis, args.processes, args.updates,
                                    args.flag_every, tau))
        elif b == "redis":
            with RedisServer(durable=False) as srv:
                rows.append(run_backend("redis (no persistence)", srv.url, args.processes, args.updates,
                                        args.flag_every, tau))
        elif b == "redis-aof-everysec":
            with RedisServer(durable=True, appendfsync="everysec") as srv:
                rows.append(run_backend("redis (AOF fsync everysec)", srv.url, args.processes, args.updates,
                                        args.flag_every, tau))
        elif b == "redis-aof-always":
            with RedisServer(durable=True) as srv:
                rows.append(run_backend("redis (AOF fsync always)", srv.url, args.processes, args.updates,
                                        args.flag_every, tau))
        else:
            raise SystemExit(f"unknown backend {b!r}")
    import redis as redis_py

    doc = {
        "benchmark": "ledger_throughput", "command": " ".join([os.path.basename(sys.argv[0])] + (argv or sys.argv[1:])),
        "processes": args.processes, "updates_per_process": args.updates, "flag_every": args.flag_every,
        "rule": {"tau": tau, "rho": 0.5}, "one_client": True,
        "machine": {"cpus": os.cpu_count(), "loadavg_at_end": os.getloadavg(), "platform": platform.platform(),
                    "python": platform.python_version(), "redis_py": redis_py.__version__,
                    "redis_server": os.popen("redis-server --version").read().strip()},
        "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "results": rows,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
