"""Smoke measurement of the held-out generator families (guardian_plugin/evaluation/families.py):
``--n`` images of each at 32 px, the fitted families learning from the first ``--fit`` CIFAR-10 train
images, on one CPU thread. Writes seconds per family, the high-frequency-energy rule's flag rate and
each family's contrast to smoke.json / smoke.md, and a 6 x 6 PNG grid per family (and one of real
images) for a person to look at.

    OMP_NUM_THREADS=1 python benchmarks/families_smoke.py      # about an hour on one core

CIFAR-10 is decoded here from ../shared/data/cifar10-jpeg/train.npz, in a seeded random order (the
file is sorted by class): the first ``fit`` fit the families, the next 2,000 calibrate the rule, the
next 2,000 measure its FPR. The project's split
loader (guardian_plugin/training/data.py, written on another branch) is to replace this decode, and
its detector-train split the first range, once merged.
"""

from __future__ import annotations

import argparse
import io
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
from guardian_plugin.training.data import to_float  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "..", "shared", "data", "cifar10-jpeg", "train.npz")
OUT = os.path.join(ROOT, "benchmarks", "results", "families")
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)  # examples/cifar10 victim normalisation
FAMILIES = ["random_bn_train", "random_bn_eval", "vae", "gan_transposed", "gan_bilinear", "ddim_few_steps",
            "laundered:gan_transposed", "laundered:random_bn_train"]


def cifar_jpeg(path: str, n: int, seed: int = 0) -> np.ndarray:
    """``n`` images of a cifar10-jpeg npz, in a seeded random order (the file is sorted by class), as
    uint8 (n, 3, 32, 32)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: the CIFAR-10 JPEG copy lives in ../shared/data/cifar10-jpeg")
    z = np.load(path)
    jpeg, off = z["jpeg"], z["offsets"]
    idx = np.random.RandomState(seed).permutation(len(off) - 1)[:n]
    return np.stack([np.asarray(Image.open(io.BytesIO(jpeg[off[i]:off[i + 1]].tobytes())).convert("RGB")).transpose(2, 0, 1)
                     for i in idx])


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

    real = cifar_jpeg(DATA, args.fit + 4000, seed=args.seed)
    fit, calib, held = real[:args.fit], real[args.fit:args.fit + 2000], real[args.fit + 2000:]
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
