"""Load test through both adapters: many concurrent clients of three kinds for --seconds each.

    python benchmarks/load_test.py [--seconds 60] [--threads 16] [--seed 0] [--targets torchserve,bentoml]
                                   [--identity client-id|keys]

Servers: TorchServe 0.12 with the example MNIST archive `guardian protect`ed (2 workers, batch_size 8,
max_batch_delay 20 ms, tau 4) and `bentoml serve bento.service:MNISTGuarded` (2 workers, tau auto = 14;
client threads alternate between its APIs classify and classify_batch). Client threads, each with its
own X-Client-Id:

- benign   (half the threads): held-out MNIST test digits, one per request, each thread through all
           256 from its own starting point
- bad      (a quarter): malformed requests from tests/fuzz_strategies.py (random bytes, broken images,
           JSON of any shape, bad multipart, ...; drawn once with --seed). Some are valid random images,
           which get flagged: a bad client refused (403) goes on under a new id (bad-j.1, ...)
- attacker (a quarter): DFME-generator images (examples/mnist/serving.generator_images) until refused
           (403), then the thread stops

``--identity keys``: the servers take issued API keys only (``identity.api_key_header: X-Api-Key``,
guardian_plugin.keys); every client above gets a key issued in the server's ledger store (a bad client
refused gets a new one, as if the operator issued it), and an eighth of the threads (taken from the
attackers) are key-minting attackers: DFME-generator images, each request under a new key made without
the service's secret (random strings, ``gk_`` keys with random parts, its own issued key with another
client id or key id). They must get nothing but 401, and the ledger must hold no client that was not
issued a key. Results: benchmarks/results/load_test_keys.json.

Reported per server and client kind: requests sent, requests/s, status counts, 5xx (must be 0; 500s
that TorchServe's Java frontend answers while decoding multipart/url-encoded bodies, before any handler,
are counted apart as upstream), attackers refused and after how many answered queries. Then the ledger
check: for every client, the ledger's ``queries`` (the SQLite file the server used, opened with
guardian_plugin.ledger.open_ledger in the server's namespace) equals the rows of the 200 answers it
received. Also: workers alive afterwards. Writes benchmarks/results/load_test.json and prints a table.
Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (ROOT, os.path.join(ROOT, "tests")):
    if p not in sys.path:
        sys.path.insert(0, p)

import requests  # noqa: E402

import fuzz_strategies as fz  # noqa: E402
from benchmarks.fuzz_requests import write_report  # noqa: E402
from examples.mnist import serving as ex  # noqa: E402

OUT = os.path.join(ROOT, "benchmarks", "results", "load_test.json")
OUT_KEYS = os.path.join(ROOT, "benchmarks", "results", "load_test_keys.json")


def minted_key(rng, own_key: str) -> str:
    """A key made without the service's secret: random, random parts in the key format, or the
    attacker's own issued key with another client id or key id (the HMAC then does not verify)."""
    _, client, key_id, mac = own_key.split("_")
    pick = rng.randrange(4)
    if pick == 0:
        return rng.randbytes(24).hex()
    if pick == 1:
        return f"gk_c-{rng.randbytes(6).hex()}_{rng.randbytes(8).hex()}_{rng.randbytes(16).hex()}"
    if pick == 2:
        return f"gk_c-{rng.randbytes(6).hex()}_{key_id}_{mac}"
    return f"gk_{client}_{rng.randbytes(8).hex()}_{mac}"


class Client(threading.Thread):
    def __init__(self, kind: str, cid: str, target, bodies, deadline: float):
        super().__init__(daemon=True)
        self.kind, self.cid, self.target, self.bodies, self.deadline = kind, cid, target, bodies, deadline
        self.name0 = cid
        self.statuses: Counter = Counter()
        self.error_types: Counter = Counter()
        self.rows = 0              # rows of the 200 answers: what the ledger must count
        self.rows_by_client = {cid: 0}  # a bad client takes a new id when refused (bad-j, bad-j.1, ...)
        self.five = self.upstream = self.malformed_200 = 0
        self.refused_after = None  # attacker: answered queries before the first 403
        self.errors = []           # transport errors (timeouts, resets)

    def run(self):
        import random

        s = requests.Session()
        rng = random.Random(self.cid)
        own = self.target.headers(self.cid).get("X-Api-Key") if self.kind == "minter" else None
        i = 0
        while time.monotonic() < self.deadline:
            body = self.bodies[i % len(self.bodies)]
            i += 1
            try:
                if self.kind == "bad":
                    r = self.target.send(s, body, self.cid, timeout=120)
                elif self.kind == "minter":  # a new identity per request, without the secret
                    r = self.target.benign(s, body, self.cid, timeout=120,
                                           headers={"X-Api-Key": minted_key(rng, own)})
                else:
                    r = self.target.benign(s, body, self.cid, timeout=120)
            except requests.RequestException as e:
                self.errors.append(f"{type(e).__name__}: {e}"[:300])
                continue
            self.statuses[r.status_code] += 1
            if r.status_code == 200:
                rows = fz.rows_of(self.target.api, r)
                if rows is None:
                    self.malformed_200 += 1
                else:
                    self.rows += len(rows)
                    self.rows_by_client[self.cid] += len(rows)
                continue
            et = fz._error_type(r)
            self.error_types[str(et)] += 1
            if r.status_code >= 500:
                if self.kind == "bad" and fz.known_upstream(self.target, body, r):
                    self.upstream += 1
                else:
                    self.five += 1
                    if len(self.errors) < 5:
                        what = body.describe(80) if self.kind == "bad" else "a well-formed image"
                        self.errors.append(f"{r.status_code} {r.text[:200]} for {what}")
            if self.kind == "attacker" and r.status_code == 403:
                self.refused_after = self.rows
                return
            if self.kind == "bad" and r.status_code == 403:  # its valid random images got it refused
                self.cid = f"{self.name0}.{len(self.rows_by_client)}"
                self.rows_by_client[self.cid] = 0


def run_server(name: str, targets, seconds: float, threads: int, seed: int, digits, fakes, bad,
               minters: int = 0):
    clients = []
    n_benign, n_bad = threads // 2, threads // 4
    for j in range(threads):
        kind = "benign" if j < n_benign else ("bad" if j < n_benign + n_bad else
                                              "minter" if j >= threads - minters else "attacker")
        target = targets[j % len(targets)]
        # benign: every held-out digit, from its own starting point (a client replaying a few images over
        # and over fails the per-client distribution test, guardian_plugin.distribution, and is refused)
        rot = j * len(digits) // threads
        bodies = {"benign": digits[rot:] + digits[:rot], "bad": bad[j::threads] or bad,
                  "attacker": fakes[j::threads] or fakes, "minter": fakes[j::threads] or fakes}[kind]
        clients.append(Client(kind, f"{name}-{kind}-{j}", target, bodies, 0.0))
    for c in clients:  # with issued keys: every client's key, before the clock starts
        c.target.headers(c.cid)
    deadline = time.monotonic() + seconds
    for c in clients:
        c.deadline = deadline
    t0 = time.perf_counter()
    for c in clients:
        c.start()
    for c in clients:
        c.join()
    wall = time.perf_counter() - t0
    return clients, wall


def report(name: str, targets, clients, wall: float) -> dict:
    kinds = {}
    for kind in ("benign", "bad", "attacker", "minter"):
        cs = [c for c in clients if c.kind == kind]
        if not cs:
            continue
        st = Counter()
        et = Counter()
        for c in cs:
            st.update(c.statuses)
            et.update(c.error_types)
        sent = sum(st.values())
        kinds[kind] = {"clients": len(cs), "requests": sent, "req_per_s": round(sent / wall, 1),
                       "status_counts": {str(k): v for k, v in sorted(st.items())},
                       "5xx": sum(c.five for c in cs), "upstream_5xx": sum(c.upstream for c in cs),
                       "malformed_200": sum(c.malformed_200 for c in cs), "rows_answered": sum(c.rows for c in cs),
                       "error_types": dict(sorted(et.items())),
                       "transport_errors": sum(len([e for e in c.errors if not e[:3].isdigit()]) for c in cs)}
        if kind == "attacker":
            kinds[kind]["refused"] = sum(c.refused_after is not None for c in cs)
            kinds[kind]["answered_before_refusal"] = [c.refused_after for c in cs]
        if kind == "minter":
            kinds[kind]["only_401"] = set(st) <= {401}
    # the ledger: queries == rows of 200 answers, client by client (the ledger of each target's server)
    by_ledger = {}
    for c in clients:
        by_ledger.setdefault((c.target.ledger, c.target.namespace), []).append(c)
    mismatches, checked, unexpected = {}, 0, []
    for (uri, ns), cs in by_ledger.items():
        want = {cid: n for c in cs for cid, n in c.rows_by_client.items()}
        got = cs[0].target.ledger_queries(list(want))
        checked += len(want)
        for cid, n in want.items():
            if got[cid] != n:
                mismatches[cid] = {"ledger_queries": got[cid], "rows_answered": n}
        if cs[0].target.keys is not None:  # issued keys: no client but those issued a key (no minted one)
            issued = {cs[0].target.ledger_id(k) for k in cs[0].target.keys}
            unexpected += sorted(set(cs[0].target.ledger_clients()) - issued)
    alive = [w for w in {t.alive() for t in targets} if w]
    total = sum(k["requests"] for k in kinds.values())
    return {"server": name, "apis": [t.api for t in targets], "seconds": round(wall, 1), "requests": total,
            "req_per_s": round(total / wall, 1), "5xx": sum(k["5xx"] for k in kinds.values()),
            "upstream_5xx": sum(k["upstream_5xx"] for k in kinds.values()), "kinds": kinds,
            "ledger_clients_checked": checked, "ledger_mismatches": mismatches, "server_problems": alive,
            "benign_all_200": all(set(c.statuses) <= {200} for c in clients if c.kind == "benign"),
            "identity": "keys" if targets[0].keys is not None else "client-id",
            "ledger_unissued_clients": unexpected[:20],
            "examples_of_5xx": [e for c in clients for e in c.errors if e[:1] == "5"][:8],
            "transport_errors": [e for c in clients for e in c.errors if not e[:3].isdigit()][:5]}


def print_table(res: dict) -> None:
    print(f"\n{res['server']} ({', '.join(res['apis'])}): {res['requests']} requests in {res['seconds']} s = "
          f"{res['req_per_s']} req/s; 5xx: {res['5xx']}" + (f" (+{res['upstream_5xx']} upstream TorchServe-frontend 500s)"
                                                          if res["upstream_5xx"] else ""))
    print(f"  {'kind':<9} {'clients':>7} {'requests':>8} {'req/s':>7} {'5xx':>4}  status counts")
    for kind, k in res["kinds"].items():
        extra = f"  refused {k['refused']}/{k['clients']} after {k['answered_before_refusal']} answers" \
            if kind == "attacker" else (f"  only 401: {k['only_401']}" if kind == "minter" else "")
        print(f"  {kind:<9} {k['clients']:>7} {k['requests']:>8} {k['req_per_s']:>7} {k['5xx']:>4}  "
              f"{k['status_counts']}{extra}")
    mm = res["ledger_mismatches"]
    print(f"  ledger: {res['ledger_clients_checked'] - len(mm)}/{res['ledger_clients_checked']} clients with "
          f"queries == rows answered" + (f"; MISMATCHES {mm}" if mm else ""))
    if res["identity"] == "keys":
        print(f"  ledger clients not issued a key: {res['ledger_unissued_clients'] or 'none'}")
    for p in res["server_problems"]:
        print(f"  server: {p}")
    for e in res["examples_of_5xx"][:4]:
        print(f"  5xx: {e}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60.0, help="load duration per server")
    ap.add_argument("--threads", type=int, default=16, help="client threads per server")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--targets", default="torchserve,bentoml")
    ap.add_argument("--identity", choices=["client-id", "keys"], default="client-id",
                    help="keys: issued API keys only, with key-minting attackers in the mix")
    ap.add_argument("--out", default=None, help=f"default: {OUT} ({OUT_KEYS} with --identity keys)")
    args = ap.parse_args(argv)
    args.out = args.out or (OUT_KEYS if args.identity == "keys" else OUT)
    minters = args.threads // 8 if args.identity == "keys" else 0
    digits, _ = ex.real_digits(256, offset=500)  # held out (the test split has 1000)
    fakes = ex.generator_images(256, seed=args.seed + 7)
    bad = fz.sample_cases(400, seed=args.seed)
    work = tempfile.mkdtemp(prefix="guardian-load-")
    results, failures = [], []
    for name in args.targets.split(","):
        if name == "torchserve":
            srv, t = fz.start_torchserve(os.path.join(work, "torchserve"), identity=args.identity)
            targets = [t]
        else:
            srv, targets = fz.start_bento(os.path.join(work, "bento"), identity=args.identity)
        try:
            clients, wall = run_server(name, targets, args.seconds, args.threads, args.seed, digits, fakes, bad,
                                       minters)
            res = report(name, targets, clients, wall)
        finally:
            srv.stop()
        results.append(res)
        print_table(res)
        if res["5xx"] or res["ledger_mismatches"] or res["server_problems"] or res["ledger_unissued_clients"] or \
                any(k["malformed_200"] for k in res["kinds"].values()) or not res["kinds"].get("minter", {}).get(
                    "only_401", True) or (args.identity == "keys" and not res["benign_all_200"]):
            failures.append(name)
    return write_report(args.out, {"benchmark": "load_test", "seconds": args.seconds, "threads": args.threads,
                                   "seed": args.seed, "identity": args.identity, "servers": results}, failures,
                        "all checks passed")


if __name__ == "__main__":
    sys.exit(main())
