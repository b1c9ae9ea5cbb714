"""A stand-in detector for the ImageNet example, trainable today in minutes, for the steps that need *a*
detector before the example's own (detector-config.yaml) can be trained: the archive protection, the
demo, the TorchServe overhead benchmark and tests/test_imagenet_example.py.

    python -m examples.imagenet.standin [--out examples/imagenet/artifacts/detector-standin] [--size 96]

What it is, so that no figure of it is mistaken for the example's:
- real class: crops of the offline photos (kind photos, ``min_side``: no 25 px faces), at ``--size``;
- three synthetic "sources" (folder sources written here): a randomly initialised DFME generator
  (GeneratorA, train-mode batch statistics) at 32 px, upsampled to ``--size`` by nearest, bilinear and
  bicubic interpolation, one per source: images shaped like the planned ``upsample_from: 32`` sources
  but from untrained generators;
- the CIFAR-10 detector's sub-detectors (npr transform, three small_resnet width 16 / 2 blocks), one
  epoch; ``guardian protect --input-fit area`` maps the handler's 224 px tensor to ``--size``.

Its detection figures mean nothing. Its *cost* is the point: at 96 px each sub-detector sees as many
pixels as the planned 3 x 3 grid of 32 px patches, and there are three of them instead of one shared
trunk with three heads, so its guard time is an upper bound on the planned detector's (the area
down-sampling of 224 -> 96 px is extra). ``--subdetectors 1`` trains one: about the planned shared
trunk's cost (its heads are negligible).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import yaml

from examples.imagenet import serving as ix
from examples.pipeline import ENV, guardian

STANDIN = os.path.join(ix.ARTIFACTS, "detector-standin")
MODES = ("nearest", "bilinear", "bicubic")


def synthetic(n: int, size: int, mode: str, seed: int):
    """``n`` uint8 images from a randomly initialised GeneratorA at 32 px, upsampled to ``size``."""
    import torch
    import torch.nn.functional as F

    from guardian_plugin.nets import GeneratorA
    from guardian_plugin.training.data import to_uint8

    torch.manual_seed(seed)
    g = GeneratorA(256, 3, 32).train()
    with torch.no_grad():
        x = g(torch.randn(n, 256)) * 0.5 + 0.5   # tanh output in [-1, 1] -> pixels, as DFME's pixel variant
        kw = {} if mode == "nearest" else {"align_corners": False}
        x = F.interpolate(x, size=(size, size), mode=mode, **kw).clamp(0, 1)
    return to_uint8(x)


def config(out: str, size: int, n: int, epochs: int, victim_pt: str, modes=MODES) -> dict:
    return {
        "seed": 0, "device": "cpu", "channels": 3, "size": size, "mean": ix.MEAN, "std": ix.STD,
        "victim": {"arch": ix.ARCH, "num_classes": 1000, "weights": os.path.abspath(victim_pt)},
        "real": {
            "train": [{"name": "photos", "kind": "photos", "group": "train", "n": n, "seed": 0, "min_side": size}],
            "calibrate": [{"name": "photos", "kind": "photos", "group": "calibrate", "n": max(n // 2, 10), "seed": 1,
                           "min_side": size}],
            "evaluate": [{"name": "photos", "kind": "photos", "group": "evaluate", "n": max(n // 2, 10), "seed": 2,
                          "min_side": size}],
        },
        "generative_data": "photos",
        "sources": {f"generator_{m}": {"kind": "folder", "n": n, "params": {"path": os.path.join(out, "sources", m)}}
                    for m in modes},
        "test_fraction": 0.2,
        "detector": {"transform": "npr", "arch": "small_resnet", "arch_params": {"width": 16, "blocks": 2},
                     "epochs": epochs, "batch_size": 32, "lr_step": 1},
        "target_fpr": 0.05,
        "cache": os.path.join(out, "cache"),
    }


def train_standin(out: str = STANDIN, size: int = 96, n: int = 200, epochs: int = 1,
                  victim_pt: str = ix.VICTIM_PT, quiet: bool = False, subdetectors: int = 3) -> str:
    """Write the sources and config under ``out.work`` (beside the artifact: `guardian protect` embeds
    every file of the artifact's folder) and run `guardian train-detector` into ``out``."""
    from guardian_plugin.training.data import save_image_folder

    if not os.path.exists(victim_pt):
        ix.export_victim(os.path.dirname(victim_pt))
    work = os.path.abspath(out).rstrip(os.sep) + ".work"
    modes = MODES[:subdetectors]
    for k, m in enumerate(modes):
        save_image_folder(synthetic(n, size, m, seed=k), os.path.join(work, "sources", m))
    cfg_path = os.path.join(work, "standin-config.yaml")
    with open(cfg_path, "w") as f:
        yaml.safe_dump(config(work, size, n, epochs, victim_pt, modes), f, sort_keys=False)
    subprocess.run(guardian("train-detector", "--config", cfg_path, "--out", out, "--threads", "1", "--device", "cpu",
                            "--no-progress"), check=True, env=ENV,
                   stdout=subprocess.DEVNULL if quiet else None, stderr=subprocess.STDOUT if quiet else None)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=STANDIN, help="the artifact folder (its sources and config go to OUT.work)")
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--n", type=int, default=400, help="real and per-source training images")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--subdetectors", type=int, default=3, choices=(1, 2, 3),
                    help="sources, one sub-detector each (1: the cost of the planned shared trunk, whose three heads "
                         "are a few hundred parameters each)")
    a = ap.parse_args(argv)
    print(train_standin(a.out, a.size, a.n, a.epochs, subdetectors=a.subdetectors))
    return 0


if __name__ == "__main__":
    sys.exit(main())
