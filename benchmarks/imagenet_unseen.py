"""The ImageNet example's detector on generator families it never saw (issue #14: "DAcc ... on an unseen
family"), each sent as an attacker sends it (224 px images) and put through the served view
(image_classifier's Resize(256) + CenterCrop(224)) as the server does:

    python benchmarks/imagenet_unseen.py [--detector examples/imagenet/artifacts/detector] [--n 200] [--seed 0]

Families (none of them is a training source: those are a DFME GeneratorA at 32 px in train mode, a DCGAN
and a DDPM trained on the photos, all upsampled from 32 px by bilinear interpolation):
  generatorA_bn_eval_56_nearest   an untrained DFME generator at 56 px, BatchNorm in eval mode, nearest x4
  generatorA_train_64_bicubic     an untrained DFME generator at 64 px in train mode, bicubic x3.5
  dcgan_64_bicubic                an untrained DCGAN generator at 64 px (train mode), bicubic
  smooth_noise_8_bicubic          uniform noise at 8 px, bicubic up to 224 (no generator at all)
Untrained generators are the weakest attackers (an attack's first queries); trained ones are not
covered here. Writes benchmarks/results/imagenet_unseen.json and prints the flagged share per family.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from guardian_plugin.detector import load_detector  # noqa: E402
from guardian_plugin.nets import DCGANGenerator, GeneratorA  # noqa: E402
from guardian_plugin.training.data import served_view, to_uint8  # noqa: E402


def _up(x: torch.Tensor, mode: str, size: int = 224) -> torch.Tensor:
    kw = {} if mode == "nearest" else {"align_corners": False}
    return F.interpolate(x, size=(size, size), mode=mode, **kw).clamp(0, 1)


def family(name: str, n: int, seed: int) -> torch.Tensor:
    """(n, 3, 224, 224) images in [0, 1], as the attacker sends them."""
    torch.manual_seed(seed)
    with torch.no_grad():
        if name == "generatorA_bn_eval_56_nearest":
            g = GeneratorA(nz=256, channels=3, size=56).eval()
            x = (g(torch.randn(n, 256)) + 1) / 2
            return _up(x, "nearest")
        if name == "generatorA_train_64_bicubic":
            g = GeneratorA(nz=256, channels=3, size=64).train()
            x = (g(torch.randn(n, 256)) + 1) / 2
            return _up(x, "bicubic")
        if name == "dcgan_64_bicubic":
            g = DCGANGenerator(nz=64, channels=3, size=64).train()
            return _up(g(torch.randn(n, 64)), "bicubic")  # sigmoid output: [0, 1] pixels
        if name == "smooth_noise_8_bicubic":
            return _up(torch.rand(n, 3, 8, 8), "bicubic")
    raise KeyError(name)


FAMILIES = ["generatorA_bn_eval_56_nearest", "generatorA_train_64_bicubic", "dcgan_64_bicubic",
            "smooth_noise_8_bicubic"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--detector", default=os.path.join(ROOT, "examples", "imagenet", "artifacts", "detector"))
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "imagenet_unseen.json"))
    a = ap.parse_args(argv)
    det = load_detector(a.detector)
    results = {}
    for name in FAMILIES:
        sent = to_uint8(family(name, a.n, a.seed))
        seen = torch.from_numpy(served_view(sent, 256, 224)).float() / 255.0  # what the server's handler makes
        flagged, scores = det.flag(seen)
        per_head = (scores >= det.thresholds).float().mean(0).tolist()
        results[name] = {"n": a.n, "flagged": float(flagged.float().mean()),
                         "per_head": dict(zip(det.names, per_head))}
        print(f"{name:34s} flagged {results[name]['flagged']:.1%}  "
              + "  ".join(f"{k} {v:.1%}" for k, v in results[name]["per_head"].items()), flush=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"benchmark": "imagenet_unseen", "detector": os.path.relpath(a.detector, ROOT), "seed": a.seed,
                   "commit": commit, "served_view": [256, 224], "results": results}, f, indent=2)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
