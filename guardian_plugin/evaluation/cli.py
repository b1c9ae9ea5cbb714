"""`guardian evaluate --config CFG --out DIR`: run the attack suite, write results.json, tables.md and
clone_accuracy.png (see guardian_plugin.evaluation.harness)."""

from __future__ import annotations

import argparse
import shlex
import sys


def _csv(v: str):
    return [s for s in v.split(",") if s]


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate", help="run the data-free attacks against each defense configuration; write the paper's tables",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="evaluation YAML (e.g. benchmarks/attacks_mnist.yaml)")
    p.add_argument("--out", required=True, help="output directory (results.json, tables.md, clone_accuracy.png)")
    p.add_argument("--attacks", type=_csv, default=None, help="comma-separated attack ids (default: all in the config)")
    p.add_argument("--configurations", type=_csv, default=None,
                   help="comma-separated subset of no_defense,model_guardian,dpreds_only,detector_only,raw_detector,"
                        "defense_in_depth,prada")
    p.add_argument("--seeds", type=lambda v: [int(s) for s in _csv(v)], default=None, help="comma-separated seeds")
    p.add_argument("--device", default=None, help="cpu | cuda (overrides the config)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (overrides the config)")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs at once, each in its own process with --threads torch threads (default 1)")
    p.add_argument("--resume", action="store_true", help="keep finished runs in OUT/runs.jsonl and skip them")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_evaluate)


def _evaluate(args) -> int:
    from guardian_plugin.evaluation.config import load_eval_config
    from guardian_plugin.evaluation.harness import run_evaluation

    cfg = load_eval_config(args.config)
    if args.device:
        cfg.device = args.device
    if args.threads:
        cfg.threads = args.threads
    command = "guardian " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["evaluate"] else \
        f"guardian evaluate --config {args.config} --out {args.out}"
    run_evaluation(cfg, args.out, attacks=args.attacks, configurations=args.configurations, seeds=args.seeds,
                   resume=args.resume, progress=not args.no_progress, command=command,
                   jobs=args.jobs)
    print(f"wrote {args.out}/results.json, tables.md, clone_accuracy.png")
    return 0
