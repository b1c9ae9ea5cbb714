"""Cost per image of each transformation model (and of the pretrained sub-detector) on CIFAR-sized input.

    OMP_NUM_THREADS=1 python benchmarks/transform_cost.py [--size 32] [--batch 64] [--repeats 5]

One thread, random [0, 1] images of 3 x size x size, the fastest of ``repeats`` timed batches after one
warm-up batch (the least disturbed by other work on a shared machine). Weights do not change the cost, so the discriminator is untrained (width 64, as in the
CIFAR-10 example). Writes benchmarks/results/transform_cost.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from guardian_plugin.detector import SubDetector  # noqa: E402
from guardian_plugin.transform import TransformContext, build_transform  # noqa: E402

TRANSFORMS = [
    ("identity", {}),
    ("npr", {}),
    ("discriminator", {"width": 64}),
    *[("effnet_gradient", {"resolution": r}) for r in (32, 64, 128, 224)],
    ("effnet_gradient", {"resolution": 224, "objective": "feature_norm", "block": 2}),
    ("effnet_features", {"resolution": 224, "block": 2}),
    ("effnet_features", {"resolution": 64, "block": 2}),
]
SUBDETECTORS = [
    ("small_resnet", {"width": 16, "blocks": 2}),
    *[("effnet_lite0_head", {"resolution": r}) for r in (32, 64, 128, 224)],
]


def timed(fn, x, repeats: int) -> float:
    """Milliseconds per image, the fastest batch."""
    fn(x)
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(x)
        runs.append((time.perf_counter() - t) * 1000 / len(x))
    return min(runs)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "transform_cost"))
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.rand(a.batch, 3, a.size, a.size)
    ctx = TransformContext(3, a.size)
    rows = []
    for name, spec in TRANSFORMS:
        if name == "discriminator":
            from guardian_plugin.nets import DCGANDiscriminator
            from guardian_plugin.transform import TransformModel

            t = TransformModel("discriminator", DCGANDiscriminator(3, width=spec["width"]))
        else:
            t = build_transform(name, dict(spec, **({"scale": 1.0} if name == "effnet_features" else {})), ctx)
        rows.append({"kind": "transform", "name": name, "settings": spec, "ms_per_image": timed(t, x, a.repeats)})
        print(rows[-1], flush=True)
    rep = torch.rand(a.batch, 3, a.size, a.size) * 255
    for arch, params in SUBDETECTORS:
        sub = SubDetector(arch, 3, a.size, **params).eval()
        with torch.no_grad():
            rows.append({"kind": "sub-detector", "name": arch, "settings": params,
                         "ms_per_image": timed(sub, rep, a.repeats)})
        print(rows[-1], flush=True)
    result = {"size": a.size, "batch": a.batch, "repeats": a.repeats, "threads": torch.get_num_threads(),
              "versions": {"torch": torch.__version__, "python": platform.python_version()},
              "machine": platform.machine(), "rows": rows}
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out + ".json", "w") as f:
        json.dump(result, f, indent=2)
    lines = [f"Cost per image, 3 x {a.size} x {a.size} input, batch {a.batch}, one thread, fastest of {a.repeats} batches "
             f"(`python benchmarks/transform_cost.py`).", "",
             "| kind | name | settings | ms / image |", "|---|---|---|---|"]
    lines += [f"| {r['kind']} | {r['name']} | {json.dumps(r['settings'])} | {r['ms_per_image']:.3f} |" for r in rows]
    with open(a.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
