"""Smoke measurement of the held-out generator families (guardian_plugin/evaluation/families.py):
``--n`` images of each at 32 px, the fitted families learning from the first ``--fit`` CIFAR-10 train
images, on one CPU thread. Writes seconds per family, the high-frequency-energy rule's flag rate and
each family's contrast to smoke.json / smoke.md, and a 6 x 6 PNG grid per family (and one of real
images) for a person to look at.

    OMP_NUM_THREADS=1 python benchmarks/families_smoke.py      # about an hour on one core

Real images come from the project's CIFAR-10 splits (docs/cifar10.md): the first ``fit`` of
``detector_train`` fit the families (the only split a family may learn from), 2,000 of ``calibrate``
calibrate the rule, 2,000 of ``test`` measure its FPR. The committed smoke.json was produced before
this script used the split loader (5,000 + 2,000 + 2,000 seeded-random train images, and the random
generators mapped with the earlier CIFAR normalisation 0.4914.../0.2470...); a rerun gives
figures of the same kind, not the same numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from guardian_plugin.evaluation.families import FamilyContext, generate, hf_energy_rule  # noqa: E402
from guardian_plugin.evaluation.harness import versions  # noqa: E402
from guardian_plugin.training.data import cifar10_split, to_float  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "benchmarks", "results", "families")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # the CIFAR victim's normalisation (docs/cifar10.md)
FAMILIES = ["random_bn_train", "random_bn_eval", "vae", "gan_transposed", "gan_bilinear", "ddim_few_steps",
            "laundered:gan_transposed", "laundered:random_bn_train"]


def save_grid(x: np.ndarray, path: str, side: int = 6, pad: int = 2) -> None:
    """``side`` x ``side`` images spread evenly over ``x`` (every init / sampler of a family shows)."""
    idx = np.linspace(0, len(x) - 1, side * side).round().astype(int)
    c, h, w = x.shape[1:]
    grid = np.full((side * (h + pad) + pad, side * (w + pad) + pad, 3), 255, np.uint8)
    for k, i in enumerate(idx):
        r, q = divmod(k, side)
        img = x[i].transpose(1, 2, 0)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = img
    Image.fromarray(grid).save(path, optimize=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--fit", type=int, default=5000, help="train images the fitted families learn from")
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)

    fit = cifar10_split("detector_train", args.fit)[0]
    calib, held = cifar10_split("calibrate", 2000)[0], cifar10_split("test", 2000)[0]
    rule = hf_energy_rule(calib)
    save_grid(held, os.path.join(args.out, "real.png"))
    ctx = FamilyContext(to_float(fit), MEAN, STD, seed=args.seed, cache_dir=os.path.join(ROOT, ".cache", "families"),
                        progress=True)
    std = lambda x: float(to_float(x).flatten(1).std(1).mean())  # noqa: E731  mean per-image contrast
    results = {"real (held out)": {"hf_rule_flagged": float(rule(held).mean()), "contrast": std(held)}}
    for name in args.families.split(","):
        t = time.time()
        x = generate(name, ctx, args.n)
        results[name] = {"seconds": round(time.time() - t, 1), "cached": ctx.info["cached"],
                         "hf_rule_flagged": float(rule(x).mean()), "contrast": std(x)}
        save_grid(x, os.path.join(args.out, name.replace(":", "_") + ".png"))
        print(name, results[name], flush=True)

    out = {"n": args.n, "fit_images": args.fit, "seed": args.seed, "jpeg75": True, "threads": 1,
           "hf_rule_bounds": rule.bounds, "families": results, "versions": versions()}
    with open(os.path.join(args.out, "smoke.json"), "w") as f:
        json.dump(out, f, indent=2)
    rows = [f"| {k} | {v.get('seconds', '')} | {v['hf_rule_flagged']:.1%} | {v['contrast']:.3f} |" for k, v in results.items()]
    with open(os.path.join(args.out, "smoke.md"), "w") as f:
        f.write(f"# Held-out generator families: smoke run ({args.n} images each, fitted on {args.fit} CIFAR-10 "
                f"train images, one CPU thread, JPEG q75 round trip)\n\n"
                "| family | seconds (fit + sample) | HF-energy rule flagged | contrast (per-image std) |\n"
                "|---|---:|---:|---:|\n" + "\n".join(rows) + "\n")
    print(f"wrote {args.out}/smoke.json, smoke.md and the grids")
    return 0


if __name__ == "__main__":
    sys.exit(main())
