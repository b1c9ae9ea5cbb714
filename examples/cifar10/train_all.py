"""`make train-cifar10`: the whole CIFAR-10 pipeline, victim -> detector sources -> detector, with the
time of each stage written to examples/cifar10/artifacts/pipeline-timing.json.

    python -m examples.cifar10.train_all [--skip-victim] [--device cpu|cuda|auto] [--jobs 2]

1. victim: `python -m examples.cifar10.train_victim` (fine-tunes the shared pretrained ResNet-56);
   ``--skip-victim`` keeps the committed one.
2. sources: `guardian train-detector --prepare-only`, one process per group of sources in parallel
   (``--jobs``, default 2: DFME + GAN + the transform model in one, the diffusion model in the other),
   each on one thread; cached under .cache/cifar10 by their settings, so a rerun reuses them.
3. detector: `guardian train-detector` with the cached sources -> examples/cifar10/artifacts/detector.

Every stage shows its own progress bars. On CUDA the stages run one after the other on the GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CONFIG = os.path.join(HERE, "detector-config.yaml")
ARTIFACTS = os.path.join(HERE, "artifacts")
# Balanced on this machine's measured source times (2 CPU cores, contended): DFME 1,713 s + GAN 364 s
# (+ the discriminator transform) in one process, the diffusion model's 2,750 s in the other
SOURCE_GROUPS = [["dfme", "gan"], ["diffusion"]]


def guardian(*args: str) -> list:
    return [sys.executable, "-m", "guardian_plugin.cli", *args]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-victim", action="store_true", help="keep the committed victim")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--jobs", type=int, default=2, help="source processes in parallel on CPU (1: one after another)")
    ap.add_argument("--out", default=os.path.join(ARTIFACTS, "detector"))
    ap.add_argument("--cache", default=None, help="cache folder (default: the config's, .cache/cifar10); an empty "
                                                   "one times the pipeline from scratch")
    ap.add_argument("--timing", default=os.path.join(ARTIFACTS, "pipeline-timing.json"))
    a = ap.parse_args(argv)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cache = ["--cache", os.path.abspath(a.cache)] if a.cache else []
    stages = {}

    t = time.time()
    if not a.skip_victim:
        subprocess.run([sys.executable, "-m", "examples.cifar10.train_victim", "--device", a.device,
                        "--threads", str(os.cpu_count() or 1)], check=True, cwd=ROOT, env=env)
        stages["victim"] = round(time.time() - t, 1)

    t = time.time()
    groups = SOURCE_GROUPS if a.jobs > 1 and a.device != "cuda" else [sum(SOURCE_GROUPS, [])]
    procs = []
    for k, group in enumerate(groups):
        # only the first group trains the default transform's model (cached): the others skip it
        transform = [] if k == 0 else ["--transform", "identity"]
        procs.append(subprocess.Popen(guardian("train-detector", "--config", CONFIG, "--out",
                                               os.path.join(ROOT, "runs", "cifar10", f"prepare-{k}"), "--prepare-only",
                                               "--sources", *group, *transform, *cache, "--threads", "1",
                                               "--device", a.device),
                                      cwd=ROOT, env=env))
    codes = [p.wait() for p in procs]
    if any(codes):
        sys.exit(f"source generation failed (exit codes {codes}); the log above names the source")
    stages["sources"] = round(time.time() - t, 1)

    t = time.time()
    subprocess.run(guardian("train-detector", "--config", CONFIG, "--out", a.out, *cache, "--threads", "1",
                            "--device", a.device), check=True, cwd=ROOT, env=env)
    stages["detector"] = round(time.time() - t, 1)

    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    out = {"stages_s": stages, "total_s": round(sum(stages.values()), 1), "device": a.device, "jobs": a.jobs,
           "cpu_count": os.cpu_count(), "machine": platform.machine(), "commit": commit or None,
           "command": "python -m examples.cifar10.train_all " + " ".join(sys.argv[1:] if argv is None else argv)}
    with open(a.timing, "w") as f:
        json.dump(out, f, indent=2)
    print("stages: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in stages.items()) + f"; total {out['total_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
