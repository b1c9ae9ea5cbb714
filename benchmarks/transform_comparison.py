"""Compare transformation models for the MNIST example detector, over several detector seeds.

    python benchmarks/transform_comparison.py [--transforms discriminator victim identity] [--seeds 0 1 2]

The synthetic sources are generated once (cached by `guardian train-detector`); only the
transformation model and the sub-detectors' training seed change. The default transform is chosen on
the synthetic VALIDATION split (`validation_dacc`), never on the test figures this prints.
Writes benchmarks/results/transform_comparison.{json,md}; artifacts under runs/transforms/.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from guardian_plugin.training.config import load_train_config  # noqa: E402
from guardian_plugin.training.pipeline import train_detector  # noqa: E402


def ms(values):
    """(mean, sample std); the std is None for a single value: no spread was measured."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None)


def fmt(m, s, pct=True):
    if m is None:
        return "-"
    if s is None:
        return f"{100 * m:.1f}" if pct else f"{m:.4f}"
    return f"{100 * m:.1f} ± {100 * s:.1f}" if pct else f"{m:.4f} ± {s:.4f}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=os.path.join(ROOT, "examples/mnist/detector-config.yaml"))
    ap.add_argument("--transforms", nargs="+", default=["discriminator", "victim", "identity"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--device", default=None)
    ap.add_argument("--runs", default=os.path.join(ROOT, "runs", "transforms"))
    ap.add_argument("--out", default=os.path.join(HERE, "results", "transform_comparison"))
    a = ap.parse_args(argv)
    rows = {}
    for t in a.transforms:
        reports = []
        for s in a.seeds:
            out = os.path.join(a.runs, f"{t}-seed{s}")
            path = os.path.join(out, "report.json")
            if os.path.exists(path):
                with open(path) as f:
                    rep = json.load(f)
            else:
                cfg, base = load_train_config(a.config)
                cfg.detector.transform, cfg.detector.per_source_transform, cfg.detector.seed = t, {}, s
                rep = train_detector(cfg, base, out, device=a.device, config_path=a.config)
            reports.append(rep)
            print(f"{t} seed {s}: " + ", ".join(f"{k} {v['ensemble']:.3f}" for k, v in rep["dacc"].items())
                  + " | FPR " + ", ".join(f"{k} {v['ensemble']:.3f}" for k, v in rep["fpr"].items()), flush=True)
        sources = list(reports[0]["dacc"])
        groups = list(reports[0]["fpr"])
        rows[t] = {
            "seeds": a.seeds,
            "dacc": {src: ms([r["dacc"][src]["ensemble"] for r in reports]) for src in sources},
            "fpr": {g: ms([r["fpr"][g]["ensemble"] for r in reports]) for g in groups},
            "roc_auc": {src: ms([min(r["roc_auc"][src].values()) for r in reports]) for src in sources},
            "validation_dacc_mean": ms([statistics.mean(r["validation_dacc"].values()) for r in reports]),
            "seconds_detector": ms([sum(v for k, v in r["timings_s"].items() if k.startswith("subdetector_"))
                                    for r in reports]),
        }
    best = max(rows, key=lambda t: rows[t]["validation_dacc_mean"][0])
    result = {"chosen_by": "validation_dacc_mean (synthetic validation split; test figures not used)",
              "best": best, "rows": rows, "config": a.config}
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out + ".json", "w") as f:
        json.dump(result, f, indent=2)
    src = list(next(iter(rows.values()))["dacc"])
    grp = list(next(iter(rows.values()))["fpr"])
    lines = [f"| transform | " + " | ".join(f"DAcc {s} (%)" for s in src) + " | "
             + " | ".join(f"FPR {g} (%)" for g in grp) + " | min ROC-AUC " + "/".join(src) + " | validation DAcc (%) |",
             "|" + "---|" * (2 + len(src) + len(grp) + 1)]
    for t, r in rows.items():
        lines.append(f"| {t}{' (default)' if t == best else ''} | " + " | ".join(fmt(*r["dacc"][s]) for s in src) + " | "
                     + " | ".join(fmt(*r["fpr"][g]) for g in grp) + " | "
                     + " / ".join(f"{r['roc_auc'][s][0]:.4f}" for s in src) + f" | {fmt(*r['validation_dacc_mean'])} |")
    table = "\n".join(lines)
    with open(a.out + ".md", "w") as f:
        spread = "mean ± std over" if len(a.seeds) > 1 else "one run, no spread measured:"
        f.write(f"{spread} detector seed(s) {a.seeds}; test splits; thresholds at ensemble FPR <= target on "
                f"calibration groups; the default is chosen on the validation column.\n\n{table}\n")
    print(table)
    print(f"best on validation: {best}")


if __name__ == "__main__":
    main()
