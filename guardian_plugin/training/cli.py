"""`guardian train-detector`."""

from __future__ import annotations

import os


def register(sub) -> None:
    p = sub.add_parser("train-detector", help="train a DFMS-Detector artifact offline on your own data",
                       description="Train the detector described by CFG and write the artifact directory OUT "
                                   "(detector.yaml, weights, report.json, roc.png).")
    p.add_argument("--config", required=True, help="training config YAML (see examples/mnist/detector-config.yaml)")
    p.add_argument("--out", required=True, help="artifact directory to write")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto (default: the config's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from guardian_plugin.training.config import load_train_config
    from guardian_plugin.training.pipeline import print_summary, train_detector

    cfg, base = load_train_config(args.config)
    report = train_detector(cfg, base, os.path.abspath(args.out), device=args.device,
                            progress=not args.no_progress, config_path=args.config)
    print_summary(report)
    print(f"artifact: {args.out}")
    return 0
