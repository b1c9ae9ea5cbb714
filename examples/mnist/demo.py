"""The README's demo (`make demo`): the MNIST example served by a real TorchServe, protected by
`guardian protect`, answering a benign client and a DFME attacker over HTTP.

    python -m examples.mnist.demo [--digits 1000] [--attack-budget 4000] [--keep]

1. Reuses the committed victim and detector (examples/mnist/artifacts); trains them only if missing.
2. Builds the example archive with torch-model-archiver and its own handler file (mnist_handler.py),
   the way TorchServe's MNIST example does, then runs `guardian protect` on it.
3. Starts TorchServe on loopback ports (2 workers per model, batching on) with both archives.
4. A benign client sends the 1,000 held-out MNIST test digits to both endpoints; an attacker runs DFME
   (generator-synthesised queries) against the protected one until it is refused.
5. Prints benign accuracy protected vs unprotected, the attacker's flagged share and the query at which
   it was refused, and stops the server.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch

from examples import torchserve_demo as demo
from examples.mnist import serving as ex

DETECTOR_CONFIG = os.path.join(ex.ROOT, "examples", "mnist", "detector-config.yaml")


def ensure_artifacts() -> None:
    """Train the victim and the detector only when they are missing."""
    if not os.path.exists(ex.VICTIM_TS):
        print("victim missing: training it (python -m examples.mnist.train_victim) ...", flush=True)
        subprocess.run([sys.executable, "-m", "examples.mnist.train_victim"], check=True, cwd=ex.ROOT)
    if not os.path.exists(os.path.join(ex.DETECTOR, "detector.yaml")):
        if not os.path.exists(DETECTOR_CONFIG):
            sys.exit(f"detector artifact {ex.DETECTOR} and its config {DETECTOR_CONFIG} are missing")
        print("detector missing: training it (guardian train-detector; up to an hour on 2 CPU cores) ...", flush=True)
        subprocess.run([sys.executable, "-m", "guardian_plugin.cli", "train-detector", "--config", DETECTOR_CONFIG,
                        "--out", ex.DETECTOR], check=True, cwd=ex.ROOT)
        if not os.path.exists(os.path.join(ex.DETECTOR, "detector.yaml")):
            sys.exit(f"training did not produce {ex.DETECTOR}/detector.yaml")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--digits", type=int, default=1000, help="benign test digits to send (default: all 1,000)")
    demo.add_common_args(ap)
    args = ap.parse_args(argv)
    t0 = time.time()
    torch.set_num_threads(1)
    ensure_artifacts()

    from guardian_plugin.attacks.dfme import DFME
    from guardian_plugin.attacks.target import QueryRefused  # noqa: F401 (raised by the target)
    from guardian_plugin.nets import LeNet5
    from guardian_plugin.devserver.torchserve import build_archive
    from guardian_plugin.attacks.target import TorchServeTarget
    from guardian_plugin.training.data import mnist_splits, normalise, to_float

    work, store, ledger_uri, guard_yaml = demo.workdir(args.workdir, "guardian-demo-", "mnist")

    print(f"[1/4] torch-model-archiver: the example archive with its own handler file ({work})", flush=True)
    mar = build_archive("mnist", ex.VICTIM_TS, ex.MNIST_HANDLER, store)
    demo.protect_archive(mar, ex.DETECTOR, guard_yaml, os.path.join(store, "mnist_protected.mar"))

    print("[2/4] TorchServe: mnist and mnist_protected, 2 workers each, batching on", flush=True)
    ts = demo.serve(store, work, ("mnist", "mnist_protected"))
    try:

        print(f"[3/4] benign client: {args.digits} held-out MNIST test digits to both endpoints", flush=True)
        x, y = mnist_splits()["test"]
        bodies = [ex.png(x[i, 0]) for i in range(args.digits)]
        labels = [int(v) for v in y[: args.digits]]
        plain = TorchServeTarget(ts.url, "mnist", 10, ex.MNIST_MEAN, ex.MNIST_STD, client_id="benign-user")
        guarded = TorchServeTarget(ts.url, "mnist_protected", 10, ex.MNIST_MEAN, ex.MNIST_STD, client_id="benign-user")
        t = time.time()
        acc_plain = demo.accuracy(plain.send(bodies), labels)
        acc_guarded = demo.accuracy(guarded.send(bodies), labels)
        benign_s = time.time() - t

        print("[4/4] attacker: DFME (generator-synthesised queries) against the protected endpoint", flush=True)
        x_test = normalise(to_float(x), ex.MNIST_MEAN, ex.MNIST_STD)

        @torch.no_grad()
        def clone_accuracy(model):
            model.eval()
            return float((model(x_test).argmax(1) == torch.from_numpy(y)).float().mean())

        target = TorchServeTarget(ts.url, "mnist_protected", 10, ex.MNIST_MEAN, ex.MNIST_STD, client_id="attacker")
        attack = DFME(target, LeNet5(1, 10), budget=args.attack_budget, image_shape=(1, 28, 28), seed=0,
                      evaluate=clone_accuracy, progress=False, batch_size=16, m=1, clone_steps=5)
        result = attack.run()

        summary = {
            "benign_accuracy_unprotected": acc_plain,
            "benign_accuracy_protected": acc_guarded,
            **demo.ledger_summary(guard_yaml, ledger_uri, "mnist", target, result),
            "benign_seconds": round(benign_s, 1),
            "total_seconds": round(time.time() - t0, 1),
        }
    finally:
        ts.stop()

    demo.print_summary("Model-Guardian on TorchServe: MNIST example", summary, f"{args.digits} test digits")
    demo.finish(work, args.keep or args.workdir is not None, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
