"""Produce the MNIST attack benchmark (results.json, tables.md, clone_accuracy.png) with one command.

    python benchmarks/run_attacks.py                 # the full benchmark, resumable
    python benchmarks/run_attacks.py --quick         # the seconds-long quick configuration
    python benchmarks/run_attacks.py --seeds 0 --attacks dfme --configurations no_defense

Equivalent to `guardian evaluate --config benchmarks/attacks_mnist.yaml --out
benchmarks/results/attacks_mnist --resume`; extra arguments are passed through.
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    quick = "--quick" in argv
    if quick:
        argv.remove("--quick")
    name = "attacks_quick" if quick else "attacks_mnist"
    args = ["evaluate", "--config", os.path.join(HERE, f"{name}.yaml")]
    if "--out" not in argv:
        args += ["--out", os.path.join(HERE, "results", name)]
    if not quick and "--resume" not in argv:
        args.append("--resume")
    sys.path.insert(0, os.path.dirname(HERE))
    from guardian_plugin.cli import main as guardian

    return guardian(args + argv)


if __name__ == "__main__":
    sys.exit(main())
