"""What `guardian protect --calibrate` buys and costs on the CIFAR-10 example's served path.

    python benchmarks/served_calibration.py [--sizes 200,1000,4000] [--test-images 1000]
        [--windows benchmarks/results/attacks_cifar10_cpu/windows] [--out benchmarks/results/served_calibration_cifar10.json]

The CIFAR-10 victim behind TorchServe's built-in ``image_classifier`` handler (Resize 256, CenterCrop
224; examples/cifar10/serving.py) is protected with ``--input-fit area``, once with the artifact's
thresholds (calibrated at 32 px) and once per calibration size with ``--calibrate`` on that many images
of the detector's calibration split (PNG files, the first N; training images no detector step trained
on). Everything is scored in process exactly as a worker scores it (the handler's own preprocess, the
embedded detector copy), on data the calibration never saw:

- benign: the first ``--test-images`` of the stratified test split (PNG), the flagged share;
- attack queries: the query windows that `guardian evaluate` recorded in the undefended runs of
  benchmarks/attacks_cifar10_cpu.yaml (``windows/<attack>-<seed>.pt``: 500 queries at each of 5 points
  of the run, in the victim's input space; gitignored, so present only where those runs ran), sent as
  8-bit PNGs; the flagged share per window, and, for reference, the share of the 32 px queries as the
  attack tables score them (in process, the artifact's thresholds).

Prints one table and writes the JSON. CPU only (a few minutes); the scores do not depend on the
thresholds, so each image is scored once.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from examples.cifar10 import serving as cx  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="200,1000,4000", help="calibration image counts (the split holds 4,000)")
    ap.add_argument("--test-images", type=int, default=1000, help="benign test images (default 1,000)")
    ap.add_argument("--windows", default=os.path.join(ROOT, "benchmarks", "results", "attacks_cifar10_cpu", "windows"))
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "served_calibration_cifar10.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()

    from guardian_plugin.detector import InputMapping, load_detector
    from guardian_plugin.handlers.archive import protect
    from guardian_plugin.training.data import cifar10_split, to_float, to_uint8

    det = load_detector(cx.DETECTOR).eval()  # the artifact at 32 px (the attack tables' view)
    served = load_detector(cx.DETECTOR).eval()  # what the protected archive's workers compute
    served.spec = served.spec.model_copy(update={"input": InputMapping(mean=cx.MEAN, std=cx.STD, fit="area")})
    artifact_thr = det.thresholds.numpy().copy()

    def served_scores(x_uint8: np.ndarray, batch: int = 100) -> np.ndarray:
        return np.concatenate([served.scores(served.to_pixels(cx.handler_preprocess(cx.png_bodies(x_uint8[i:i + batch]))))
                               .numpy() for i in range(0, len(x_uint8), batch)])

    def raw_scores(x_uint8: np.ndarray, batch: int = 250) -> np.ndarray:
        return np.concatenate([det.scores(to_float(x_uint8[i:i + batch])).numpy() for i in range(0, len(x_uint8), batch)])

    share = lambda s, thr: float((s >= thr).any(1).mean())  # noqa: E731

    x_test, _ = cifar10_split("test", args.test_images)
    test_served = served_scores(x_test)
    test_raw = share(raw_scores(x_test), artifact_thr)
    mean, std = torch.tensor(cx.MEAN).view(1, 3, 1, 1), torch.tensor(cx.STD).view(1, 3, 1, 1)
    windows = {}
    for path in sorted(glob.glob(os.path.join(args.windows, "*.pt"))):
        name = os.path.basename(path)[:-3]
        ws = [to_uint8((w.float() * std + mean).clamp(0, 1)) for w in torch.load(path)]
        windows[name] = {"served": [served_scores(u) for u in ws], "raw_32px_artifact": [share(raw_scores(u), artifact_thr) for u in ws]}
        print(f"scored {name}: {len(ws)} windows", flush=True)

    thresholds = {"artifact": (artifact_thr, None)}
    with tempfile.TemporaryDirectory() as work:
        store = os.path.join(work, "store")
        os.makedirs(store)
        mar = cx.build_served_archive(work, store)
        for n in [int(v) for v in args.sizes.split(",")]:
            folder = cx.calibration_folder(os.path.join(work, f"cal{n}"), n)
            out = os.path.join(store, f"p{n}.mar")
            protect(mar, cx.DETECTOR, out, input_fit="area", calibrate=folder)
            rep = cx.embedded_calibration(out)
            thresholds[f"served, {n} images"] = (np.array(list(rep["thresholds_after"].values()), dtype=np.float32), rep)

    rows = []
    for label, (thr, rep) in thresholds.items():
        row = {"thresholds": label, "values": dict(zip(det.names, map(float, thr))),
               "benign_test_flagged_share": share(test_served, thr),
               "attack_windows_flagged_share": {k: [share(s, thr) for s in v["served"]] for k, v in windows.items()}}
        if rep is not None:
            row["calibration"] = {k: rep[k] for k in ("images", "calibrated_on", "held_out", "quantile_level",
                                                      "flagged_share_held_out_before", "flagged_share_held_out_after")}
        rows.append(row)

    print(f"\nServed path (Resize 256 + CenterCrop 224, input fit area), benign = first {args.test_images} test images")
    names = list(windows)
    print(f"{'thresholds':<22} {'benign':>7}  " + "  ".join(f"{n:>26}" for n in names))
    print(f"{'32 px, artifact':<22} {test_raw:>7.1%}  " + "  ".join(
        f"{' '.join(f'{v:.0%}' for v in windows[n]['raw_32px_artifact']):>26}" for n in names))
    for r in rows:
        print(f"{r['thresholds']:<22} {r['benign_test_flagged_share']:>7.1%}  " + "  ".join(
            f"{' '.join(f'{v:.0%}' for v in r['attack_windows_flagged_share'][n]):>26}" for n in names))
    result = {"benchmark": "served_calibration", "test_images": args.test_images,
              "benign_flagged_share_32px_artifact": test_raw,
              "windows": {k: {"file": os.path.relpath(os.path.join(args.windows, k + ".pt"), ROOT),
                              "raw_32px_artifact": v["raw_32px_artifact"]} for k, v in windows.items()},
              "rows": rows, "seconds": round(time.time() - t0, 1), "torch": torch.__version__}
    from benchmarks.fuzz_requests import write_report

    return write_report(os.path.abspath(args.out), result, [], f"{result['seconds']:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
