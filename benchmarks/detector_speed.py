"""The committed detector artifacts scored as saved (``fast=False``: every module as trained) and on the
default inference path (batch norms folded, channels-last, the independent sub-detectors of one shape as
one network of grouped convolutions, the heads on a trunk as one product), side by side in one run.

    python benchmarks/detector_speed.py [--batches 1,2,8] [--repeats 7] [--threads 1]

Per artifact and batch size: median ms per batch of each path (interleaved repeats, so drift on a shared
machine hits both alike), their ratio, and the largest score difference between the paths on the same
random pixels. Batches of 1-2 are what a TorchServe worker mostly sees at moderate load (batch_size 8,
max_batch_delay 5 ms). Writes benchmarks/results/detector_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from guardian_plugin.detector import Detector, load_detector  # noqa: E402

ARTIFACTS = ["examples/mnist/artifacts/detector", "examples/cifar10/artifacts/detector",
             "examples/cifar10/artifacts/detector-raw", "examples/imagenet/artifacts/detector"]
OUT = os.path.join(ROOT, "benchmarks", "results", "detector_speed.json")


def per_batch_ms(fn, x, n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        fn(x)
    return (time.perf_counter() - t) / n * 1000.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,2,8")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for rel in ARTIFACTS:
        path = os.path.join(ROOT, rel)
        if not os.path.exists(os.path.join(path, "detector.yaml")):
            print(f"{rel}: missing, skipped")
            continue
        fast = load_detector(path, device=args.device)
        saved = Detector(fast.spec, dict(fast.transforms), list(fast.subs), dict(fast.trunks), fast=False).to(args.device)
        c, size = fast.spec.image.channels, fast.spec.image.size
        for b in (int(v) for v in args.batches.split(",")):
            x = torch.rand(b, c, size, size, device=args.device)
            diff = float((fast.scores(x) - saved.scores(x)).abs().max())
            n = max(3, int(40 / b)) if size <= 64 else max(2, int(8 / b))
            for f in (fast.flag, saved.flag):  # warm-up
                per_batch_ms(f, x, 2)
            t_fast, t_saved = [], []
            for _ in range(args.repeats):
                t_saved.append(per_batch_ms(saved.flag, x, n))
                t_fast.append(per_batch_ms(fast.flag, x, n))
            row = {"artifact": rel, "image": f"{c}x{size}x{size}", "batch": b,
                   "saved_ms": statistics.median(t_saved), "default_ms": statistics.median(t_fast),
                   "speedup": statistics.median(t_saved) / statistics.median(t_fast), "max_score_diff": diff}
            rows.append(row)
            print(f"{rel:42s} batch {b}: as saved {row['saved_ms']:7.2f} ms  default {row['default_ms']:7.2f} ms  "
                  f"x{row['speedup']:.2f}  max |score diff| {diff:.1e}", flush=True)
    out = {"benchmark": "detector_speed", "rows": rows,
           "setup": {"threads": args.threads, "repeats": args.repeats, "device": args.device,
                     "what": "Detector.flag on uniform random pixels, median ms per batch"},
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(f"wrote {os.path.relpath(args.out, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
