"""What Model-Guardian costs a BentoML service: requests/s and latency, protected vs unprotected, in one run.

    .venv/bin/python benchmarks/bentoml_overhead.py                  # writes benchmarks/results/bentoml_overhead.json
    .venv/bin/python benchmarks/bentoml_overhead.py --seconds 20 --rounds 4 --concurrency 8

Both example services (bento/service.py: ``MNISTUnprotected`` and ``MNISTGuarded``, the same class, the
same worker count) run side by side under ``bentoml serve`` on 127.0.0.1; a closed-loop client with N
threads (one keep-alive session each) sends held-out real MNIST digits from many client ids, so the
guard runs its full path (identity, ledger read, gradient, detector, ledger update) and nobody is
refused. Phases alternate unprotected / protected for several rounds so that load from elsewhere on the
machine hits both alike. The client runs on the same machine and its CPU time is part of the picture;
the JSON records the machine, the load average and the guard's own time from the server's /metrics.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import tempfile
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
OUT = os.path.join(ROOT, "benchmarks", "results", "bentoml_overhead.json")


def Server(target: str, env: dict, log: str):
    from guardian_plugin.devserver.bentoml import BentoServer

    return BentoServer(target, env, log, cwd=ROOT, timeout_s=300)


def run_phase(url: str, path: str, payloads, seconds: float, concurrency: int, clients: int, tag: str):
    """Closed loop for ``seconds``: (latencies in s, errors, wall seconds)."""
    import requests

    lat, errors = [], []
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds

    def worker(k: int):
        s = requests.Session()
        i = k
        mine = []
        while time.perf_counter() < stop_at:
            files = payloads[i % len(payloads)]
            cid = f"{tag}-client-{i % clients}"
            t0 = time.perf_counter()
            try:
                r = s.post(url + path, files=files, headers={"X-Client-Id": cid}, timeout=120)
                ok = r.status_code == 200
            except requests.RequestException as e:  # counted, not hidden
                ok, r = False, e
            dt = time.perf_counter() - t0
            if ok:
                mine.append(dt)
            else:
                with lock:
                    errors.append(str(getattr(r, "status_code", r)))
            i += concurrency
        with lock:
            lat.extend(mine)

    t0 = time.perf_counter()
    ths = [threading.Thread(target=worker, args=(k,)) for k in range(concurrency)]
    [t.start() for t in ths]
    [t.join() for t in ths]
    return lat, errors, time.perf_counter() - t0


def guard_metrics(url: str) -> dict:
    import requests

    text = requests.get(url + "/metrics", timeout=30).text
    out = {}
    for api in ("classify", "classify_batch"):
        s = re.search(rf'^guardian_guard_seconds_sum{{api="{api}",service="[^"]+"}} ([0-9.e+-]+)$', text, re.M)
        c = re.search(rf'^guardian_guard_seconds_count{{api="{api}",service="[^"]+"}} ([0-9.e+-]+)$', text, re.M)
        q = re.search(rf'^guardian_queries_total{{api="{api}",service="[^"]+"}} ([0-9.e+-]+)$', text, re.M)
        f = re.search(rf'^guardian_flagged_total{{api="{api}",service="[^"]+"}} ([0-9.e+-]+)$', text, re.M)
        if s and c and float(c.group(1)) > 0:
            out[api] = {"guard_calls": int(float(c.group(1))), "guard_ms_mean": 1000 * float(s.group(1)) / float(c.group(1)),
                        "images_inspected": int(float(q.group(1))) if q else None,
                        "images_flagged": int(float(f.group(1))) if f else 0}
    return out


def summary(lat, errors, wall, images_per_request):
    a = np.array(lat) * 1000.0
    n = len(a)
    return {"requests": n, "errors": len(errors), "error_codes": sorted(set(errors))[:5], "seconds": round(wall, 2),
            "requests_per_s": round(n / wall, 2), "images_per_s": round(n * images_per_request / wall, 2),
            "p50_ms": round(float(np.percentile(a, 50)), 2) if n else None,
            "p90_ms": round(float(np.percentile(a, 90)), 2) if n else None,
            "p99_ms": round(float(np.percentile(a, 99)), 2) if n else None,
            "mean_ms": round(float(a.mean()), 2) if n else None}


def markdown(out: dict) -> str:
    """The result as a Markdown table (what docs/bentoml.md and the README quote)."""
    st = out["setup"]
    lines = [f"{out['when_utc']}, {out['machine']['cpus']} CPUs (load average {out['machine']['loadavg_before'][0]} "
             f"before, {out['machine']['loadavg_after'][0]} after), {st['workers_per_service']} workers per service, "
             f"{st['client_threads']} client threads, {st['rounds']} x {st['seconds_per_phase']:g} s per variant, "
             f"detector `{st['detector']}`",
             "",
             "| API | variant | requests/s | images/s | p50 ms | p99 ms | errors |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for api, res in out["results"].items():
        label = api if api == "classify" else f"{api} ({st['batch_images_per_request']} images/request)"
        for name in ("unprotected", "protected"):
            r = res[name]
            lines.append(f"| {label} | {name} | {r['requests_per_s']} | {r['images_per_s']} | {r['p50_ms']} | "
                         f"{r['p99_ms']} | {r['errors']} |")
        o = res["overhead"]
        lines.append(f"| {label} | **protected / unprotected** | **{o['throughput_ratio']}x** | | "
                     f"**+{o['p50_added_ms']}** | **{o['p99_added_ms']:+}** | |")
    g = out.get("guard_time_from_metrics") or {}
    if g:
        lines += ["", "Guard time per call from the protected service's `guardian_guard_seconds`: " + "; ".join(
            f"{api} {v['guard_ms_mean']:.1f} ms mean over {v['guard_calls']} calls "
            f"({v['images_inspected'] / v['guard_calls']:.1f} images per call, {v['images_flagged']} flagged)"
            for api, v in g.items())]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0, help="length of one measured phase")
    ap.add_argument("--rounds", type=int, default=3, help="unprotected/protected alternations per API")
    ap.add_argument("--concurrency", type=int, default=4, help="client threads (closed loop)")
    ap.add_argument("--batch", type=int, default=16, help="images per request to /classify_batch")
    ap.add_argument("--workers", type=int, default=2, help="BentoML workers per service")
    ap.add_argument("--clients", type=int, default=32, help="distinct X-Client-Id values")
    ap.add_argument("--detector", default=os.environ.get("GUARDIAN_TEST_DETECTOR"),
                    help="detector artifact (default: the committed examples/mnist/artifacts/detector)")
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args(argv)

    import bentoml
    import torch

    from bento.client import files, real_digits

    tmp = tempfile.mkdtemp(prefix="bentoml-overhead-")
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "GUARDIAN_TORCH_THREADS": "1",
                "MNIST_BENTO_WORKERS": str(args.workers), "BENTOML_HOME": os.path.join(tmp, "bentoml_home"),
                "BENTOML_DO_NOT_TRACK": "True", "GUARDIAN_LEDGER": f"sqlite:///{tmp}/ledger.db"})
    detector = args.detector or os.path.join(ROOT, "examples", "mnist", "artifacts", "detector")
    if args.detector:
        cfg = os.path.join(tmp, "guard.yaml")
        with open(cfg, "w") as f:
            f.write(f"detector: {os.path.abspath(args.detector)}\nnamespace: mnist\n")
        env["GUARDIAN_CONFIG"] = cfg

    imgs, _ = real_digits(256, offset=0)
    single = [files([a], "image") for a in imgs]
    batched = [files(imgs[i:i + args.batch]) for i in range(0, len(imgs) - args.batch + 1, args.batch)]

    load_before = os.getloadavg()
    servers = {}
    try:
        servers["unprotected"] = Server("bento.service:MNISTUnprotected", env, os.path.join(tmp, "unprotected.log"))
        servers["protected"] = Server("bento.service:MNISTGuarded", env, os.path.join(tmp, "protected.log"))
        results = {}
        for api, path, payloads, per in (("classify", "/classify", single, 1),
                                         ("classify_batch", "/classify_batch", batched, args.batch)):
            for name, srv in servers.items():  # warm-up: every worker loads, the optimizer trains
                run_phase(srv.url, path, payloads, 3.0, args.concurrency, args.clients, f"warm-{name}")
            acc = {n: ([], [], 0.0) for n in servers}
            for r in range(args.rounds):
                order = list(servers) if r % 2 == 0 else list(reversed(list(servers)))
                for name in order:
                    lat, err, wall = run_phase(servers[name].url, path, payloads, args.seconds, args.concurrency,
                                               args.clients, f"{name}-{r}")
                    L, E, W = acc[name]
                    acc[name] = (L + lat, E + err, W + wall)
                    print(f"{api:15s} round {r} {name:12s} {len(lat) / wall:8.1f} req/s "
                          f"p50 {np.percentile(np.array(lat) * 1000, 50):7.2f} ms", flush=True)
            res = {n: summary(*acc[n], per) for n in servers}
            u, p = res["unprotected"], res["protected"]
            res["overhead"] = {
                "throughput_ratio": round(p["requests_per_s"] / u["requests_per_s"], 3),
                "throughput_drop_pct": round(100 * (1 - p["requests_per_s"] / u["requests_per_s"]), 1),
                "p50_added_ms": round(p["p50_ms"] - u["p50_ms"], 2),
                "p99_added_ms": round(p["p99_ms"] - u["p99_ms"], 2),
            }
            results[api] = res
        guard = guard_metrics(servers["protected"].url)
    finally:
        for s in servers.values():
            s.stop()
    load_after = os.getloadavg()

    out = {
        "benchmark": "bentoml_overhead",
        "command": "python benchmarks/bentoml_overhead.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "when_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "setup": {"services": "bento/service.py MNISTUnprotected vs MNISTGuarded (same class)",
                  "victim": "SmallResNet(1, 10, width 16, 1 block), 28x28 grayscale",
                  "detector": os.path.relpath(os.path.abspath(detector), ROOT),
                  "ledger": "SQLite (one file, both workers)", "traffic": "held-out real MNIST digits (PNG)",
                  "workers_per_service": args.workers, "client_threads": args.concurrency,
                  "client_ids": args.clients, "batch_images_per_request": args.batch,
                  "seconds_per_phase": args.seconds, "rounds": args.rounds,
                  "torch_threads_per_worker": 1},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "bentoml": bentoml.__version__,
                    "loadavg_before": [round(x, 2) for x in load_before],
                    "loadavg_after": [round(x, 2) for x in load_after],
                    "note": "client and both servers share these CPUs with other jobs"},
        "results": results,
        "guard_time_from_metrics": guard,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write(markdown(out) + "\n")
    print(markdown(out))
    print(json.dumps({k: v["overhead"] for k, v in results.items()}, indent=2))
    print("wrote", args.out)
    return out


if __name__ == "__main__":
    main()
