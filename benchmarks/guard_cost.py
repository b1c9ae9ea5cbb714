"""What the guard costs beside the model it guards: in process, one run, side by side.

    python benchmarks/guard_cost.py [--threads 2] [--batch 16] [--rounds 7] [--warmup 2] [--skip-old]

The victim is a torchvision ResNet-50 at 3 x 224 x 224 (random weights: weights do not change the cost),
run under ``torch.inference_mode`` on an ImageNet-normalised batch, NCHW as a served model is by default.
The guard is what ``Guardian.detect`` runs on that same batch: ``Detector.to_pixels`` then ``Detector.flag``,
for detectors of several shapes with random weights (``guardian_plugin.detector.untrained_detector``); the
first is ``DEFAULT_224``, the shipped default shape for 224 px inputs. For reference, the 32 px (CIFAR)
shapes run beside a CIFAR ResNet-20 at 32 px.

``torch.set_num_threads(--threads)``. After ``--warmup`` rounds, each of ``--rounds`` rounds runs the victim
once and then every guard once, in the same order (victim, guard, guard, ..., victim, guard, ...), so that
whatever else the machine runs hits both alike; a figure is the median over rounds, and a ratio is the
median guard time over the median victim time (``ratio_per_round`` : the median of the per-round ratios).
Writes benchmarks/results/guard_cost.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from guardian_plugin.detector import DEFAULT_224, InputMapping, untrained_detector  # noqa: E402
from guardian_plugin.transform import IMAGENET_MEAN, IMAGENET_STD, TransformModel  # noqa: E402

NPR_32 = {"transform": "npr", "arch": "small_resnet", "arch_params": {"width": 16, "blocks": 2}}  # examples/cifar10
# (name, shape, input size, victim, what it is)
SHAPES = [
    ("default_224", DEFAULT_224, 224, "resnet50", "the shipped default for 224 px (DEFAULT_224)"),
    ("default_224_plain", {**DEFAULT_224, "fast": False}, 224, "resnet50",
     "the same without the speed work (fast=False: no batch norm folding, NCHW, NPR on the whole image)"),
    ("patches_separate_224", {**DEFAULT_224, "shared_trunk": False}, 224, "resnet50",
     "the same patches, three separate small_resnets (run as one grouped network) instead of one shared trunk"),
    ("patches_4x4_224", {**DEFAULT_224, "patch": {"size": 32, "grid": 4}}, 224, "resnet50",
     "DEFAULT_224 on a 4 x 4 lattice (16 patches)"),
    ("patches_w16b2_224", {**DEFAULT_224, "arch_params": {"width": 16, "blocks": 2}}, 224, "resnet50",
     "DEFAULT_224 with the CIFAR-10 detector's wider, deeper trunk (width 16, blocks 2; the default until the ImageNet example measured its served cost)"),
    ("old_default_224", {"transform": "discriminator", "arch": "small_resnet", "arch_params": {"width": 16, "blocks": 1}},
     224, "resnet50", "the earlier default: discriminator gradient at full size + 3 full-size small_resnets"),
    ("cifar_example_32", NPR_32, 32, "cifar_resnet20", "the CIFAR-10 example's shape: NPR + 3 small_resnets at 32 px"),
    ("shared_trunk_32", {**NPR_32, "shared_trunk": True}, 32, "cifar_resnet20",
     "NPR + one shared small_resnet trunk, 3 heads, whole 32 px image"),
]
VICTIMS = {"resnet50": 224, "cifar_resnet20": 32}


def victim(name: str) -> torch.nn.Module:
    if name == "resnet50":
        import torchvision

        return torchvision.models.resnet50(weights=None).eval()
    from guardian_plugin.nets import build_classifier

    return build_classifier(name, in_channels=3, num_classes=10).eval()


def guard(shape: dict, size: int):
    """A detector of ``shape`` at ``size`` px reading ImageNet-normalised batches, and the call that
    ``Guardian.detect`` makes."""
    shape = dict(shape)
    fast = shape.pop("fast", None)
    transforms = None
    if shape["transform"] == "discriminator":  # the pipeline trains it (width 32 by default); weights do not matter
        from guardian_plugin.nets import DCGANDiscriminator

        transforms = {"discriminator": TransformModel("discriminator", DCGANDiscriminator(3, width=32))}
    det = untrained_detector(shape, 3, size, transforms=transforms, fast=fast)
    det.spec.input = InputMapping(mean=IMAGENET_MEAN, std=IMAGENET_STD)
    return lambda x: det.flag(det.to_pixels(x))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--skip-old", action="store_true", help="leave out old_default_224 (the slowest guard)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "guard_cost"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    shapes = [s for s in SHAPES if not (a.skip_old and s[0] == "old_default_224")]
    victims = {v: victim(v) for v in dict.fromkeys(s[3] for s in shapes)}
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    inputs = {v: (torch.rand(a.batch, 3, VICTIMS[v], VICTIMS[v]) - mean) / std for v in victims}
    guards = {name: guard(shape, size) for name, shape, size, _, _ in shapes}
    times = {k: [] for k in list(victims) + list(guards)}
    load_before = os.getloadavg()
    t_start = time.time()
    with torch.inference_mode():
        for r in range(a.warmup + a.rounds):
            for v, model in victims.items():
                t = time.perf_counter()
                model(inputs[v])
                ms = (time.perf_counter() - t) * 1000
                if r >= a.warmup:
                    times[v].append(ms)
                for name, _, _, vv, _ in shapes:
                    if vv != v:
                        continue
                    t = time.perf_counter()
                    guards[name](inputs[v])
                    if r >= a.warmup:
                        times[name].append((time.perf_counter() - t) * 1000)
            print(f"round {r + 1}/{a.warmup + a.rounds}" + (" (warm-up)" if r < a.warmup else "") + ": "
                  + ", ".join(f"{k} {v[-1]:.0f} ms" for k, v in times.items() if v and r >= a.warmup), flush=True)
    rows = []
    for name, shape, size, v, what in shapes:
        g, vt = times[name], times[v]
        rows.append({"name": name, "what": what, "shape": shape, "size": size, "victim": v,
                     "guard_ms": statistics.median(g), "victim_ms": statistics.median(vt),
                     "ratio": statistics.median(g) / statistics.median(vt),
                     "ratio_per_round": statistics.median([x / y for x, y in zip(g, vt)]),
                     "guard_ms_all": [round(x, 2) for x in g]})
    result = {"command": "python benchmarks/guard_cost.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "threads": torch.get_num_threads(), "batch": a.batch, "rounds": a.rounds, "warmup": a.warmup,
              "victims": {v: {"size": VICTIMS[v], "ms": statistics.median(times[v]),
                              "ms_all": [round(x, 2) for x in times[v]]} for v in victims},
              "default_224": DEFAULT_224, "target_ratio": 0.20, "goal_ratio": 0.10,
              "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "seconds": round(time.time() - t_start, 1),
              "cpu_count": os.cpu_count(), "machine": platform.machine(), "processor": platform.processor(),
              "versions": {"torch": torch.__version__, "python": platform.python_version()}, "rows": rows}
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out + ".json", "w") as f:
        json.dump(result, f, indent=2)
    lines = [f"Guard cost beside the model, batch {a.batch}, {result['threads']} threads, median of {a.rounds} interleaved "
             f"rounds after {a.warmup} warm-up (`{result['command'].strip()}`; load average "
             f"{load_before[0]:.1f} before, {result['loadavg_after'][0]:.1f} after, {os.cpu_count()} CPUs).", "",
             "| guard | what | victim | guard ms | victim ms | guard / victim |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['what']} | {r['victim']} @ {VICTIMS[r['victim']]} px | {r['guard_ms']:.1f} | "
              f"{r['victim_ms']:.1f} | {r['ratio']:.3f} |" for r in rows]
    with open(a.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
