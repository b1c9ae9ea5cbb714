"""Overhead of the guard on TorchServe: requests/s and p50/p99 latency of an example archive,
unprotected vs `guardian protect`ed, in the same run (same server, same machine, same client load).

    python benchmarks/torchserve_overhead.py [--requests 400] [--concurrency 8] [--rounds 2]
    python benchmarks/torchserve_overhead.py --example cifar10 [--requests 200]
    python benchmarks/torchserve_overhead.py --example imagenet [--detector DIR --input-fit area] [--requests 100]

``--example mnist`` (default): the MNIST example archive (its own handler), held-out digits.
``--example cifar10``: the CIFAR-10 example's archive (the ResNet-56 behind the built-in image_classifier
handler, `guardian protect --input-fit area`, as examples/cifar10/demo.py builds it), 200 test images.
``--example imagenet``: the ImageNet example (examples/imagenet: the pretrained EfficientNet-Lite0 with
the built-in image_classifier handler), the 20 foolbox ImageNet samples as JPEG bodies; its detector
is examples/imagenet/artifacts/detector unless ``--detector`` names another (e.g. the stand-in of
`python -m examples.imagenet.standin`, with ``--input-fit area``).

Both models: 2 workers, batch_size 8, max_batch_delay 5 ms, one torch thread per worker. Benign
traffic only (8 client ids, a refusal threshold no client reaches), so nobody is refused and the guard
runs on every request. Rounds alternate unprotected / protected so drift on a shared machine hits both
alike. Writes benchmarks/results/torchserve_overhead[_cifar10|_imagenet].json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import requests

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from examples.mnist import serving as ex  # noqa: E402
from guardian_plugin.handlers.archive import protect  # noqa: E402
from guardian_plugin.devserver.torchserve import TorchServe, build_archive  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results")
OUT = os.path.join(RESULTS, "torchserve_overhead.json")


def shown(path: str) -> str:
    """A path as the results show it: relative to the repository when inside it."""
    return os.path.relpath(path, ROOT) if path.startswith(ROOT) else path


def mnist_setup(work: str, store: str, args) -> dict:
    """The MNIST example's archives (unprotected ``mnist``, protected ``mnist_g``) and request bodies."""
    for p in (ex.VICTIM_TS, os.path.join(ex.DETECTOR, "detector.yaml")):
        if not os.path.exists(p):
            sys.exit(f"{p} is missing (committed example artifact; `make train-example` regenerates it)")
    mar = build_archive("mnist", ex.VICTIM_TS, ex.MNIST_HANDLER, store)
    guard = ex.guard_yaml(os.path.join(work, "guard.yaml"), f"sqlite:///{work}/ledger.db", tau=1_000_000)
    protect(mar, ex.DETECTOR, os.path.join(store, "mnist_g.mar"), config=guard)
    bodies, _ = ex.real_digits(200)
    return {"models": ("mnist", "mnist_g"), "bodies": bodies, "detector": os.path.relpath(ex.DETECTOR, ROOT),
            "model": "MNIST example LeNet-5 via examples/mnist/mnist_handler.py"}


def imagenet_setup(work: str, store: str, args) -> dict:
    """The ImageNet example's archives (``imagenet``, ``imagenet_g``; examples/imagenet/build.py) and the
    20 foolbox ImageNet samples (JPEG) as request bodies."""
    from examples.imagenet import build, serving as ix

    detector = os.path.abspath(args.detector or ix.DETECTOR)
    if not os.path.exists(os.path.join(detector, "detector.yaml")):
        sys.exit(f"no ImageNet detector artifact at {detector}: `make imagenet-example`, or --detector DIR "
                 "(e.g. `python -m examples.imagenet.standin`, then --detector examples/imagenet/artifacts/"
                 "detector-standin --input-fit area)")
    build.victim_step(work)
    mar = build.archive_step(store, work)
    guard = ex.guard_yaml(os.path.join(work, "guard.yaml"), f"sqlite:///{work}/ledger.db", tau=1_000_000)
    protect(mar, detector, os.path.join(store, "imagenet_g.mar"), config=guard, input_fit=args.input_fit)
    bodies, _, _ = ix.foolbox_samples()
    return {"models": ("imagenet", "imagenet_g"), "bodies": bodies,
            "detector": shown(detector),
            "input_fit": args.input_fit,
            "model": "ImageNet example: pretrained EfficientNet-Lite0 (224 px) via the built-in image_classifier "
                     "handler; bodies: the 20 foolbox ImageNet samples (JPEG, 512 px)"}


def cifar10_setup(work: str, store: str, args) -> dict:
    """The CIFAR-10 example's archives as `python -m examples.cifar10.demo` builds them (``cifar10``,
    ``cifar10_g``): the ResNet-56 behind the built-in image_classifier handler (a TorchScript wrapper from
    its 224 px tensor back to 32 px, examples/cifar10/serving.py), protected with ``--input-fit area``;
    the first 200 test images (PNG, 32 px) as request bodies. Needs ../shared/data."""
    from examples.cifar10 import serving as cx

    detector = os.path.abspath(args.detector or cx.DETECTOR)
    for p in (cx.VICTIM_TS, os.path.join(detector, "detector.yaml")):
        if not os.path.exists(p):
            sys.exit(f"{p} is missing (committed example artifact; docs/cifar10.md)")
    x, _ = cx.benign_images(200)  # fails naming ../shared/data when the data is absent
    model_pt = cx.served_victim(os.path.join(work, "victim224.torchscript.pt"))
    names = cx.index_to_name(os.path.join(work, "index_to_name.json"))
    mar = build_archive("cifar10", model_pt, "image_classifier", store, extra_files=[names])
    guard = ex.guard_yaml(os.path.join(work, "guard.yaml"), f"sqlite:///{work}/ledger.db", tau=1_000_000)
    protect(mar, detector, os.path.join(store, "cifar10_g.mar"), config=guard, input_fit=args.input_fit or "area")
    return {"models": ("cifar10", "cifar10_g"), "bodies": cx.png_bodies(x),
            "detector": shown(detector),
            "input_fit": args.input_fit or "area",
            "model": "CIFAR-10 example: ResNet-56 (32 px) behind the built-in image_classifier handler (224 px "
                     "tensor -> 32 px wrapper); bodies: 200 CIFAR-10 test images (PNG, 32 px)"}


SETUPS = {"mnist": mnist_setup, "cifar10": cifar10_setup, "imagenet": imagenet_setup}


def load(url: str, bodies, n: int, concurrency: int, clients: int = 8):
    """Send n requests with `concurrency` threads; returns (wall seconds, latencies ms, statuses)."""
    local = threading.local()

    def one(i):
        s = getattr(local, "s", None)
        if s is None:
            s = local.s = requests.Session()
        t = time.perf_counter()
        r = s.post(url, data=bodies[i % len(bodies)], headers={"X-Client-Id": f"bench-{i % clients}"}, timeout=60)
        return (time.perf_counter() - t) * 1000.0, r.status_code

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        res = list(pool.map(one, range(n)))
    wall = time.perf_counter() - t0
    return wall, [l for l, _ in res], [c for _, c in res]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=400, help="requests per endpoint per round")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=40)
    ap.add_argument("--example", choices=sorted(SETUPS), default="mnist")
    ap.add_argument("--detector", default=None, help="cifar10, imagenet: the detector artifact (default: the example's)")
    ap.add_argument("--input-fit", default=None, choices=["center_crop", "resize", "area"],
                    help="cifar10, imagenet: guardian protect --input-fit (default: area for cifar10, "
                         "none for imagenet)")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/torchserve_overhead.json (mnist), "
                                                "torchserve_overhead_imagenet.json (imagenet)")
    args = ap.parse_args(argv)
    args.out = args.out or (OUT if args.example == "mnist" else os.path.join(RESULTS, f"torchserve_overhead_{args.example}.json"))

    work = tempfile.mkdtemp(prefix="guardian-bench-")
    store = os.path.join(work, "store")
    setup = SETUPS[args.example](work, store, args)
    plain, guarded = setup["models"]
    bodies = setup["bodies"]
    ts = TorchServe(store, os.path.join(work, "server")).start()
    samples = {"unprotected": {"wall": 0.0, "lat": [], "n": 0, "errors": 0},
               "protected": {"wall": 0.0, "lat": [], "n": 0, "errors": 0}}
    per_round = []
    try:
        for name in (plain, guarded):
            ts.register(f"{name}.mar", name, workers=2, batch_size=8, max_batch_delay_ms=5)
        for model in (plain, guarded):  # warm-up: first batches load lazily
            load(f"{ts.url}/predictions/{model}", bodies, args.warmup, args.concurrency)
        for r in range(args.rounds):
            for label, model in (("unprotected", plain), ("protected", guarded)):
                wall, lat, codes = load(f"{ts.url}/predictions/{model}", bodies, args.requests, args.concurrency)
                s = samples[label]
                s["wall"] += wall
                s["lat"] += lat
                s["n"] += len(lat)
                s["errors"] += sum(c != 200 for c in codes)
                per_round.append({"round": r + 1, "archive": label, "requests_per_s": len(lat) / wall,
                                  "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99))})
                print(f"round {r + 1}: {label:11s} {len(lat) / wall:7.1f} req/s  p50 {np.percentile(lat, 50):6.1f} ms  "
                      f"p99 {np.percentile(lat, 99):6.1f} ms", flush=True)
        metrics = ts.metrics()
    finally:
        ts.stop()

    res = {}
    for label, s in samples.items():
        res[label] = {"requests": s["n"], "errors": s["errors"], "requests_per_s": s["n"] / s["wall"],
                      "p50_ms": float(np.percentile(s["lat"], 50)), "p99_ms": float(np.percentile(s["lat"], 99)),
                      "mean_ms": float(np.mean(s["lat"]))}
    u, p = res["unprotected"], res["protected"]
    ratio = {"throughput_protected_over_unprotected": p["requests_per_s"] / u["requests_per_s"],
             "p50_protected_over_unprotected": p["p50_ms"] / u["p50_ms"],
             "p99_protected_over_unprotected": p["p99_ms"] / u["p99_ms"]}
    guard_ms = [float(l.rsplit(" ", 1)[1]) for l in metrics.splitlines()
                if l.startswith("GuardianGuardTime{") and f'ModelName="{guarded}"' in l]
    import torch

    out = {
        "benchmark": "torchserve_overhead", "results": res, "ratio": ratio, "rounds": per_round,
        "last_batch_guard_ms": guard_ms[0] if guard_ms else None,
        "setup": {"example": args.example, "model": setup["model"], "detector": setup["detector"],
                  **({"input_fit": setup["input_fit"]} if setup.get("input_fit") else {}),
                  "workers_per_model": 2, "batch_size": 8,
                  "max_batch_delay_ms": 5, "concurrency": args.concurrency, "requests_per_round": args.requests,
                  "rounds": args.rounds, "warmup": args.warmup, "torch_threads_per_worker": 1},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "note": "2 shared CPU cores; client and server on the same machine"},
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print()
    print(f"{'':12s} {'req/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s} {'errors':>7s}")
    for label in ("unprotected", "protected"):
        r = res[label]
        print(f"{label:12s} {r['requests_per_s']:8.1f} {r['p50_ms']:8.1f} {r['p99_ms']:8.1f} {r['errors']:7d}")
    print(f"protected/unprotected: throughput x{ratio['throughput_protected_over_unprotected']:.2f}, "
          f"p50 x{ratio['p50_protected_over_unprotected']:.2f}, p99 x{ratio['p99_protected_over_unprotected']:.2f}")
    print(f"wrote {os.path.relpath(args.out, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
