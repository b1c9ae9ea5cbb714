"""What the label-only response costs benign clients: the 1,000 held-out MNIST digits through a real
TorchServe, the unprotected label-only archive (TorchServe's MNIST-example handler: postprocess returns
the argmax label, examples/mnist/mnist_label_handler.py) against its `guardian protect`ed copies with
the example detector, and how many answers differ.

    python benchmarks/label_only_cost.py [--k 2] [--repeats 5] [--concurrency 4]

Protected copies: ``response: {label_only: top1}`` (the default: flagged rows keep the model's label, so
nothing may differ) and ``{label_only: topk, k: K}`` (a flagged row's label is drawn uniformly from the
top K, so about (K-1)/K of the flagged rows differ). Every other guard setting is the shipped default
(quota, sliding window, distribution test from the artifact's reference.json); the digits come from
one client id, as one benign user would send them. The top-K archive gets the 1,000 digits
``--repeats`` times, each time from a new client id: the same digits are flagged each time, but the
labels are drawn afresh, so the mean over repeats estimates the cost better than one pass of a
handful of flagged digits can. Writes benchmarks/results/label_only_cost.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import requests
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from examples.mnist import serving as ex  # noqa: E402
from guardian_plugin.devserver.torchserve import TorchServe, build_archive  # noqa: E402
from guardian_plugin.handlers.archive import protect  # noqa: E402
from guardian_plugin.ledger import open_ledger  # noqa: E402

OUT = os.path.join(ROOT, "benchmarks", "results", "label_only_cost.json")


def answers(url: str, bodies, client: str, concurrency: int):
    local = threading.local()

    def one(body):
        s = getattr(local, "s", None)
        if s is None:
            s = local.s = requests.Session()
        r = s.post(url, data=body, headers={"X-Client-Id": client}, timeout=120)
        if r.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {r.status_code} {r.text}")
        return json.loads(r.text)

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, bodies))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=2, help="label_only: topk's k")
    ap.add_argument("--repeats", type=int, default=5, help="passes of the 1,000 digits through the top-k archive")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args(argv)
    from guardian_plugin.training.data import mnist_splits

    x, y = mnist_splits(0)["test"]
    bodies, labels = [ex.png(x[i, 0]) for i in range(len(x))], [int(v) for v in y]
    work = tempfile.mkdtemp(prefix="guardian-labelonly-")
    store = os.path.join(work, "store")
    ledger = f"sqlite:///{work}/ledger.db"
    mar = build_archive("labels", ex.VICTIM_TS, ex.MNIST_LABEL_HANDLER, store)
    variants = {"labels_top1": {"label_only": "top1"}, "labels_topk": {"label_only": "topk", "k": args.k}}
    for name, response in variants.items():
        cfg = os.path.join(work, f"{name}.yaml")
        with open(cfg, "w") as f:
            yaml.safe_dump({"ledger": ledger, "namespace": name, "response": response,
                            "identity": {"headers": ["X-Client-Id"]}}, f)
        protect(mar, ex.DETECTOR, os.path.join(store, f"{name}.mar"), config=cfg)
    ts = TorchServe(store, os.path.join(work, "server")).start()
    t0 = time.time()
    try:
        for name in ["labels", *variants]:
            ts.register(f"{name}.mar", name, workers=1, batch_size=8, max_batch_delay_ms=5)
        plain = answers(f"{ts.url}/predictions/labels", bodies, "benign", args.concurrency)
        passes = {"labels_top1": 1, "labels_topk": args.repeats}
        got = {name: [answers(f"{ts.url}/predictions/{name}", bodies, f"benign-{r}", args.concurrency)
                      for r in range(passes[name])] for name in variants}
        warned = "answers labels only" in open(ts.log_path, errors="replace").read()
    finally:
        ts.stop()
    n = len(bodies)
    result = {"digits": n, "k": args.k, "unprotected_accuracy": sum(a == b for a, b in zip(plain, labels)) / n,
              "load_warning_logged": warned, "variants": {}}
    for name in variants:
        led = open_ledger(ledger, namespace=name)
        runs = []
        for r, got_r in enumerate(got[name]):
            s = led.get(f"benign-{r}")
            differ = sum(a != b for a, b in zip(plain, got_r))
            runs.append({"differ_from_unprotected": differ, "accuracy": sum(a == b for a, b in zip(got_r, labels)) / n,
                         "ledger_queries": s.queries, "ledger_flagged": s.flagged, "refused": s.refused})
        flagged = sum(x["ledger_flagged"] for x in runs) / len(runs)
        differ = sum(x["differ_from_unprotected"] for x in runs) / len(runs)
        result["variants"][name] = {
            "response": variants[name], "passes": len(runs), "mean_differ": differ, "mean_differ_share": differ / n,
            "mean_flagged": flagged,
            "expected_differ": flagged * (args.k - 1) / args.k if variants[name]["label_only"] == "topk" else 0,
            "runs": runs,
        }
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    result.update({"command": " ".join(["python benchmarks/label_only_cost.py", *(argv or sys.argv[1:])]),
                   "seconds": round(time.time() - t0, 1), "commit": commit,
                   "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                   "machine": {"cpus": os.cpu_count(), "python": platform.python_version()}})
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
