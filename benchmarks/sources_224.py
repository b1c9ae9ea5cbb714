"""Wall time of the dfme / gan / diffusion sources at 224 x 224 with ``upsample_from`` (issue #14), one
run each, at the budgets proposed for an ImageNet example; prints the photos each group has at 224 px.

    OMP_NUM_THREADS=1 python benchmarks/sources_224.py [--sources dfme gan diffusion] [--json OUT]

Victim of the dfme source: the ImageNet-pretrained EfficientNet-Lite0 (guardian_plugin/pretrained.py,
1000 classes, inputs (x - 0.5) / 0.5). The gan and diffusion sources learn photo crops of the `train`
group at 224 px (brought down to ``upsample_from`` by area averaging)."""

from __future__ import annotations

import argparse
import json
import time

import torch

from guardian_plugin.training.data import photo_crops, photo_inventory, to_float
from guardian_plugin.training.sources import SourceContext, build_source

SIZE, MEAN, STD = 224, [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]
BUDGETS = {  # the proposed settings at 224 px (n: images each source makes)
    "dfme": {"n": 3000, "params": {"budget": 20000, "checkpoints": 5, "batch_size": 128, "memory": 0,
                                   "upsample_from": 32, "clone_arch": "lenet5",
                                   "clone_size": 32}},
    "gan": {"n": 3000, "params": {"epochs": 10, "width": 32, "upsample_from": 32}},
    "diffusion": {"n": 3000, "params": {"steps": 400, "width": 16, "sample_steps": 50, "upsample_from": 32}},
}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sources", nargs="+", default=list(BUDGETS), choices=list(BUDGETS))
    ap.add_argument("--photos", type=int, default=2000, help="photo crops the gan / diffusion sources learn")
    ap.add_argument("--dfme-budget", type=int, default=None, help="override the dfme budget (a shorter run whose "
                    "time scales linearly with the queries)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    out = {"size": SIZE, "threads": torch.get_num_threads(), "photos": {}, "sources": {}}
    for size in (SIZE, 256):
        inv = photo_inventory(size)
        out["photos"][size] = {g: {"used": len(v["used"]), "left_out": sorted({n for n, *_ in v["left_out"]})}
                               for g, v in inv.items()}
        print(f"photos at {size} px: " + "; ".join(f"{g} {len(v['used'])} photos (left out: "
                                                   f"{', '.join(sorted({n for n, *_ in v['left_out']})) or 'none'})"
                                                   for g, v in inv.items()), flush=True)
    t = time.time()
    real = to_float(photo_crops("train", args.photos, SIZE, 3, seed=0))
    out["photo_crops_s"] = round(time.time() - t, 1)
    print(f"{args.photos} photo crops at {SIZE} px: {out['photo_crops_s']} s", flush=True)
    victim = None
    if "dfme" in args.sources:
        from guardian_plugin.pretrained import efficientnet_lite0

        victim = efficientnet_lite0()
    if args.dfme_budget:
        BUDGETS["dfme"]["params"]["budget"] = args.dfme_budget
    for name in args.sources:
        spec = BUDGETS[name]
        ctx = SourceContext(real, victim, MEAN, STD, num_classes=1000, seed=0, progress=False)
        t, cpu = time.time(), time.process_time()
        x = build_source(name)(ctx, spec["n"], **spec["params"])
        secs, cpu = time.time() - t, time.process_time() - cpu
        assert x.shape == (spec["n"], 3, SIZE, SIZE), x.shape
        out["sources"][name] = {**spec, "seconds": round(secs, 1), "cpu_seconds": round(cpu, 1),
                                "info": ctx.info.get(name, {})}
        print(f"source {name} at {SIZE} px ({spec['params']}, n={spec['n']}): {secs:.1f} s wall, {cpu:.1f} s of "
              "CPU (on a shared machine the wall time is the CPU time over this process's share)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2, default=str)
    return out


if __name__ == "__main__":
    main()
