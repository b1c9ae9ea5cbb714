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
import os
import subprocess
import sys

from examples import pipeline as pl

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CONFIG = os.path.join(HERE, "detector-config.yaml")
ARTIFACTS = os.path.join(HERE, "artifacts")
# Balanced on this machine's measured source times (2 CPU cores, contended): DFME 1,713 s + GAN 364 s
# (+ the discriminator transform) in one process, the diffusion model's 2,750 s in the other
SOURCE_GROUPS = [["dfme", "gan"], ["diffusion"]]


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
    stages = pl.Stages()

    if not a.skip_victim:
        with stages("victim"):
            subprocess.run([sys.executable, "-m", "examples.cifar10.train_victim", "--device", a.device,
                            "--threads", str(os.cpu_count() or 1)], check=True, cwd=ROOT, env=pl.ENV)
    with stages("sources"):
        pl.prepare_sources(CONFIG, SOURCE_GROUPS, os.path.join(ROOT, "runs", "cifar10"), a.device, a.cache, a.jobs)
    with stages("detector"):
        pl.train_detector(CONFIG, a.out, a.device, a.cache)
    stages.write(a.timing, pl.command_line("examples.cifar10.train_all", argv), device=a.device, jobs=a.jobs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
