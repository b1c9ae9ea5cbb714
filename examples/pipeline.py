"""What the examples' detector pipelines share (`make train-cifar10`, `make imagenet-example`): the
`guardian train-detector` command line, the sources prepared in parallel processes, the detector
trained on the cached sources, and the per-stage timing file."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

from examples.torchserve_demo import ROOT

# one torch thread per process: the sources' processes share the machine's cores
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def guardian(*args: str) -> list:
    return [sys.executable, "-m", "guardian_plugin.cli", *args]


def prepare_sources(config: str, groups: Sequence[Sequence[str]], run_dir: str, device: str = "auto",
                    cache: Optional[str] = None, jobs: int = 2) -> None:
    """`guardian train-detector --prepare-only`, one process per group of sources in parallel (``jobs`` > 1
    on CPU; on CUDA, or with ``jobs`` 1, all in one process), each on one thread; cached by their
    settings, so a rerun reuses them. Only the first group trains the default transform's model."""
    cache_args = ["--cache", os.path.abspath(cache)] if cache else []
    groups = list(groups) if jobs > 1 and device != "cuda" else [sum(map(list, groups), [])]
    procs = []
    for k, group in enumerate(groups):
        transform = [] if k == 0 else ["--transform", "identity"]
        procs.append(subprocess.Popen(guardian("train-detector", "--config", config, "--out",
                                               os.path.join(run_dir, f"prepare-{k}"), "--prepare-only",
                                               "--sources", *group, *transform, *cache_args, "--threads", "1",
                                               "--device", device), cwd=ROOT, env=ENV))
    codes = [p.wait() for p in procs]
    if any(codes):
        sys.exit(f"source generation failed (exit codes {codes}); the log above names the source")


def train_detector(config: str, out: str, device: str = "auto", cache: Optional[str] = None) -> None:
    """`guardian train-detector` on the cached sources -> the artifact at ``out``."""
    cache_args = ["--cache", os.path.abspath(cache)] if cache else []
    subprocess.run(guardian("train-detector", "--config", config, "--out", out, *cache_args, "--threads", "1",
                            "--device", device), check=True, cwd=ROOT, env=ENV)


class Stages:
    """Wall-clock seconds per named stage (``with stages("name"): ...``), written by :meth:`write`."""

    def __init__(self):
        self.s: Dict[str, float] = {}

    def __call__(self, name: str):
        stages = self

        class _Clock:
            def __enter__(self):
                self.t = time.time()

            def __exit__(self, *exc):
                if exc[0] is None:
                    stages.s[name] = round(time.time() - self.t, 1)

        return _Clock()

    def write(self, path: str, command: str, **extra) -> dict:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        out = {"stages_s": self.s, "total_s": round(sum(self.s.values()), 1), **extra,
               "cpu_count": os.cpu_count(), "machine": platform.machine(), "commit": commit or None,
               "command": command}
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(out, f, indent=2)
        print("stages: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in self.s.items())
              + f"; total {out['total_s'] / 60:.1f} min", flush=True)
        return out


def command_line(module: str, argv: Optional[List[str]]) -> str:
    return f"python -m {module} " + " ".join(sys.argv[1:] if argv is None else argv)
