"""`guardian train-detector`."""

from __future__ import annotations

import logging
import os
import sys
import time


def register(sub) -> None:
    p = sub.add_parser("train-detector", help="train a DFMS-Detector artifact offline on your own data",
                       description="Train the detector described by CFG and write the artifact directory OUT "
                                   "(detector.yaml, weights, report.json, roc.png).")
    p.add_argument("--config", required=True, help="training config YAML (see examples/mnist/detector-config.yaml)")
    p.add_argument("--out", required=True, help="artifact directory to write")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto (default: the config's)")
    p.add_argument("--transform", default=None,
                   help="override detector.transform for every sub-detector (identity, discriminator, victim, ...)")
    p.add_argument("--seed", type=int, default=None, help="override the config's seed (sources and all)")
    p.add_argument("--detector-seed", type=int, default=None,
                   help="override only the sub-detectors' training seed (sources stay cached)")
    p.add_argument("--prepare-only", action="store_true",
                   help="only generate (and cache) the synthetic sources and transformation models")
    p.add_argument("--sources", nargs="+", default=None, metavar="NAME",
                   help="only these sources of the config (with --prepare-only: fill the cache for them, e.g. one "
                        "process per source in parallel; each source's cache entry does not depend on the others)")
    p.add_argument("--cache", default=None,
                   help="override the config's cache folder (sources and transforms); e.g. an empty one to time a run")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice; use 1 on a machine other jobs share)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (one line per stage start and end still goes to stderr)")
    p.add_argument("--quiet", action="store_true", help="no progress bars and no per-stage lines either")
    p.add_argument("--check", "--dry-run", dest="check", action="store_true",
                   help="only check the config (sizes, sources, transforms, architectures, files, a memory "
                        "estimate) and print the plan with each stage's estimated time (from a committed run's "
                        "report.json at that image size, scaled by the configured sizes); exit 0 when it would "
                        "run, 2 otherwise, naming the config's prepared_by command when files it reads are "
                        "missing. Every run does this check first")
    p.set_defaults(func=_run)

    r = sub.add_parser("reference", help="(re)build a detector artifact's distribution-test reference",
                       description="Write DETECTOR/reference.json: the class groups and benign envelope rates of the "
                                   "per-client distribution test (guardian_plugin.distribution), from the victim and "
                                   "the calibrate split of the training config the artifact was trained with, as they "
                                   "are and under each nuisance of the config's reference_envelope. "
                                   "`guardian train-detector` writes it already when the config has a victim.")
    r.add_argument("--config", required=True, help="the detector's training config YAML (needs `victim`)")
    r.add_argument("--detector", required=True, help="artifact directory")
    r.add_argument("--group", default=None, help="real.calibrate entry (default: the config's reference_group, "
                                                 "else its first calibrate entry)")
    r.add_argument("--device", default="cpu")
    r.set_defaults(func=_reference)


class _StderrLines(logging.Handler):
    """The stage lines, on whatever sys.stderr is when they are emitted."""

    def emit(self, record):
        try:
            print(f"[train-detector {time.strftime('%H:%M:%S')}] {record.getMessage()}", file=sys.stderr, flush=True)
        except Exception:  # noqa: BLE001  logging never stops a run
            self.handleError(record)


def _run(args) -> int:
    from guardian_plugin.training.pipeline import stage_log

    handler = None
    if not args.quiet and not args.check:
        handler = _StderrLines(logging.INFO)
        stage_log.addHandler(handler)
        old_level, stage_log.propagate = stage_log.level, False
        stage_log.setLevel(logging.INFO)
    try:
        return _run_logged(args)
    finally:
        if handler is not None:
            stage_log.removeHandler(handler)
            stage_log.setLevel(old_level)
            stage_log.propagate = True


def _run_logged(args) -> int:
    from guardian_plugin.errors import ConfigError
    from guardian_plugin.training.config import load_train_config
    from guardian_plugin.training.pipeline import print_summary, train_detector

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    cfg, base = load_train_config(args.config)
    if args.transform:
        cfg.detector.transform = args.transform
        cfg.detector.per_source_transform = {}
    if args.sources:
        unknown = sorted(set(args.sources) - set(cfg.sources))
        if unknown:
            raise SystemExit(f"--sources: {', '.join(unknown)} not in the config (it has {', '.join(cfg.sources)})")
        cfg.sources = {k: v for k, v in cfg.sources.items() if k in args.sources}
    if args.cache:
        cfg.cache = os.path.abspath(args.cache)
    if args.seed is not None:
        cfg.seed = args.seed
    if args.detector_seed is not None:
        cfg.detector.seed = args.detector_seed
    if args.check:
        from guardian_plugin.training.validate import check_config

        try:
            plan = check_config(cfg, base, args.config, out_dir=os.path.abspath(args.out), device=args.device,
                                prepare_only=args.prepare_only)
        except ConfigError as e:
            if getattr(e, "plan", None) is not None:
                print("\n".join(e.plan.lines()))
            raise
        print("\n".join(plan.lines()))
        print("config OK: nothing was loaded or trained (run without --check to train)")
        return 0
    report = train_detector(cfg, base, os.path.abspath(args.out), device=args.device,
                            progress=not (args.no_progress or args.quiet), config_path=args.config,
                            prepare_only=args.prepare_only)
    if args.prepare_only:
        print("cached: " + ", ".join(f"{k} ({v.get('cache')})" for k, v in report["sources"].items()))
        return 0
    print_summary(report)
    print(f"artifact: {args.out}")
    return 0


def _reference(args) -> int:
    from guardian_plugin.detector import load_detector
    from guardian_plugin.training.config import load_train_config
    from guardian_plugin.training.pipeline import distribution_reference, load_real, load_victim

    cfg, base = load_train_config(args.config)
    if cfg.victim is None:
        raise SystemExit(f"{args.config}: the reference needs the victim (no `victim` in the config)")
    group = args.group or cfg.reference_group or cfg.real.calibrate[0].name
    entry = next((e for e in cfg.real.calibrate if e.name == group), None)
    if entry is None:
        raise SystemExit(f"--group {group!r}: not a real.calibrate entry of {args.config}")
    det = load_detector(args.detector, device=args.device)
    ref = distribution_reference(det, load_victim(cfg, base, args.device), load_real(entry, cfg, base), cfg,
                                 args.device, f"calibrate:{group}", progress=True)
    path = ref.save(args.detector)
    print(f"{path}: {len(ref.rates)} class groups from {ref.n} images of calibrate:{group}, envelope "
          f"{', '.join(ref.envelope) or 'none'}; uncertain below confidence {ref.conf_edge:.3f}; envelope rates "
          + " ".join(f"{r:.3f}" for r in ref.rates))
    return 0
