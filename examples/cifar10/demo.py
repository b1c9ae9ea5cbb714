"""The CIFAR-10 demo (`make demo-cifar10`): the CIFAR-10 ResNet-56 served by a real TorchServe with its
BUILT-IN `image_classifier` handler, protected by `guardian protect`, answering a benign client and a
DFME attacker over HTTP.

    python -m examples.cifar10.demo [--images 1000] [--calibration-images 1000] [--attack-budget 4000]
                                    [--detector DIR] [--device auto] [--keep]

1. Archives the committed victim (examples/cifar10/artifacts) with torch-model-archiver and
   `--handler image_classifier`: the model is a TorchScript wrapper that brings the handler's 224 px
   tensor back to the victim's 32 px (examples/cifar10/serving.py), then runs
   `guardian protect --input-fit area --calibrate DIR` on it: the detector reads the same 224 -> 32 px
   mapping, and its thresholds are re-set on 1,000 calibration-split images (PNG, not the test images)
   sent through the handler's own preprocess, so that the served path keeps the artifact's 1% target.
2. Starts TorchServe on loopback ports (2 workers per model, batching on) with both archives.
3. In process (--device): the victim's accuracy and the detector's flagged share on the same test
   images as they are (32 px, the artifact's thresholds), and as the handler's Resize(256) /
   CenterCrop(224) leaves them (the thresholds the protected archive embeds).
4. A benign client sends those test images (PNG) to both endpoints; an attacker runs DFME (a
   CIFAR ResNet-20 clone, generator-synthesised queries) against the protected one until refused.
5. Prints the MNIST demo's summary plus the in-process figures next to the served ones, and stops
   the server.

The detector artifact is trained by `make train-cifar10` (a GPU job); without it the demo stops and
says so.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from examples import torchserve_demo as demo
from examples.cifar10 import serving as cx

NAME = "cifar10"


def in_process(bodies, x_uint8, labels, detector_dir: str, device: torch.device, served_thresholds=None,
               batch: int = 100) -> dict:
    """Accuracy and flagged share of the same images in process: as they are (the victim's and the
    detector's own 32 px input, the artifact's thresholds) and through the handler's preprocessing
    (served geometry, no HTTP; ``served_thresholds``: those the protected archive embeds, if calibrated)."""
    from tqdm import tqdm

    from guardian_plugin.detector import InputMapping, load_detector
    from guardian_plugin.training.data import normalise, to_float

    victim = torch.jit.load(cx.VICTIM_TS, map_location=device).eval()
    served = cx.ImageNetInputCifar(victim).eval()
    det = load_detector(detector_dir, device=device).eval()
    det_served = load_detector(detector_dir, device=device).eval()
    det_served.spec = det_served.spec.model_copy(update={"input": InputMapping(mean=cx.MEAN, std=cx.STD, fit="area")})
    if served_thresholds is not None:
        det_served.thresholds.copy_(torch.tensor(served_thresholds, dtype=torch.float32))
    y = torch.tensor(labels)
    ok_raw = ok_srv = fl_raw = fl_srv = 0
    for i in tqdm(range(0, len(labels), batch), desc="in-process", unit="batch", leave=False):
        pix = to_float(x_uint8[i:i + batch]).to(device)
        x224 = cx.handler_preprocess(bodies[i:i + batch]).to(device)
        yb = y[i:i + batch].to(device)
        with torch.no_grad():
            ok_raw += int((victim(normalise(pix, cx.MEAN, cx.STD)).argmax(1) == yb).sum())
            ok_srv += int((served(x224).argmax(1) == yb).sum())
        fl_raw += int(det.flag(pix)[0].sum())
        fl_srv += int(det_served.flag(det_served.to_pixels(x224))[0].sum())
    n = len(labels)
    return {"accuracy_32px": ok_raw / n, "accuracy_handler_geometry": ok_srv / n,
            "flagged_share_32px": fl_raw / n, "flagged_share_handler_geometry": fl_srv / n}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1000,
                    help="benign test images to send (a stratified prefix of the test split; default 1,000)")
    ap.add_argument("--detector", default=cx.DETECTOR, help="detector artifact (default: examples/cifar10/artifacts/detector)")
    ap.add_argument("--device", default="auto", help="cpu, cuda or auto, for the in-process parts (TorchServe "
                    "puts its workers on a GPU by itself when one is present)")
    ap.add_argument("--calibration-images", type=int, default=1000,
                    help="benign images of the detector's calibration split (not the test images) for `guardian "
                    "protect --calibrate`: the thresholds re-set through the handler's resize + crop (default "
                    "1,000; 0: the artifact's thresholds, calibrated at 32 px)")
    demo.add_common_args(ap)
    args = ap.parse_args(argv)
    t0 = time.time()
    detector = os.path.abspath(args.detector)
    if not os.path.exists(os.path.join(detector, "detector.yaml")):
        sys.exit(f"no CIFAR-10 detector artifact at {detector} (detector.yaml missing): train it with "
                 "`make train-cifar10` (a GPU job; docs/cifar10.md), or pass --detector DIR")
    if not os.path.exists(cx.VICTIM_TS):
        sys.exit(f"{cx.VICTIM_TS} is missing (a committed artifact): `python -m examples.cifar10.train_victim`")

    from guardian_plugin.attacks.dfme import DFME
    from guardian_plugin.nets import build_classifier
    from guardian_plugin.attacks.target import TorchServeTarget
    from guardian_plugin.training.common import resolve_device
    from guardian_plugin.training.data import normalise, to_float

    device = resolve_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    x, labels = cx.benign_images(args.images)  # fails naming ../shared/data when the data is absent
    bodies = cx.png_bodies(x)

    work, store, ledger_uri, guard_yaml = demo.workdir(args.workdir, "guardian-demo-cifar10-", NAME)

    print(f"[1/5] torch-model-archiver --handler image_classifier: the ResNet-56 behind a 224 -> 28 -> 32 px "
          f"wrapper ({work})", flush=True)
    mar = cx.build_served_archive(work, store, NAME)
    extra = ["--input-fit", "area"]
    if args.calibration_images:
        extra += ["--calibrate", cx.calibration_folder(os.path.join(work, "calibration"), args.calibration_images)]
    protected = demo.protect_archive(mar, detector, guard_yaml, os.path.join(store, f"{NAME}_protected.mar"), extra)
    calibration = cx.embedded_calibration(protected)

    print(f"[2/5] in process ({device}): victim and detector on the {args.images} test images, 32 px and "
          "through the handler's Resize(256) + CenterCrop(224)", flush=True)
    inproc = in_process(bodies, x, labels, detector, device,
                        list(calibration["thresholds_after"].values()) if calibration else None)

    print(f"[3/5] TorchServe: {NAME} and {NAME}_protected, 2 workers each, batching on", flush=True)
    ts = demo.serve(store, work, (NAME, f"{NAME}_protected"))
    try:

        print(f"[4/5] benign client: {args.images} CIFAR-10 test images (PNG) to both endpoints", flush=True)
        plain = TorchServeTarget(ts.url, NAME, 10, cx.MEAN, cx.STD, client_id="benign-user", labels=cx.CLASSES)
        guarded = TorchServeTarget(ts.url, f"{NAME}_protected", 10, cx.MEAN, cx.STD, client_id="benign-user",
                                   labels=cx.CLASSES)
        t = time.time()
        acc_plain = demo.accuracy(demo.send_with_progress(plain, bodies, "unprotected"), labels, cx.CLASSES)
        acc_guarded = demo.accuracy(demo.send_with_progress(guarded, bodies, "protected"), labels, cx.CLASSES)
        benign_s = time.time() - t

        print("[5/5] attacker: DFME (generator-synthesised queries, ResNet-20 clone) against the protected "
              "endpoint", flush=True)
        x_test = normalise(to_float(x), cx.MEAN, cx.STD)

        @torch.no_grad()
        def clone_accuracy(model):
            model.eval()
            out = torch.cat([model(x_test[i:i + 250].to(device)).cpu() for i in range(0, len(x_test), 250)])
            return float((out.argmax(1) == torch.tensor(labels)).float().mean())

        target = TorchServeTarget(ts.url, f"{NAME}_protected", 10, cx.MEAN, cx.STD, client_id="attacker",
                                  labels=cx.CLASSES)
        attack = DFME(target, build_classifier("cifar_resnet20"), budget=args.attack_budget,
                      image_shape=(3, cx.SIZE, cx.SIZE), seed=0, device=device, evaluate=clone_accuracy,
                      progress=True, batch_size=16, m=1, clone_steps=5)
        result = attack.run()

        summary = {
            "benign_accuracy_unprotected": acc_plain,
            "benign_accuracy_protected": acc_guarded,
            **{f"in_process_{k}": v for k, v in inproc.items()},
            **demo.ledger_summary(guard_yaml, ledger_uri, NAME, target, result),
            "benign_images": args.images,
            "served_calibration": calibration,
            "detector": detector,
            "device": str(device),
            "benign_seconds": round(benign_s, 1),
            "total_seconds": round(time.time() - t0, 1),
        }
    finally:
        ts.stop()

    s = summary
    demo.print_summary(
        "Model-Guardian on TorchServe: CIFAR-10 example (built-in image_classifier handler)", s,
        f"{args.images} test images as PNG, 256 resize + 224 crop", extra=[
            ("benign accuracy, in process, 32 px", f"{s['in_process_accuracy_32px']:.3f} "
             f"(the same images, the victim on its own input; {s['in_process_accuracy_handler_geometry']:.3f} "
             "through the handler's resize + crop)"),
            ("benign flagged share, in process", f"{s['in_process_flagged_share_32px']:.1%} at 32 px vs "
             f"{s['benign_flagged_share']:.1%} served ({s['in_process_flagged_share_handler_geometry']:.1%} "
             "in process through the handler's resize + crop)"),
            ("thresholds", "calibrated on the served path: " + (
                f"{calibration['calibrated_on']} calibration-split images through the handler, benign flagged "
                f"{calibration['flagged_share_held_out_before']:.1%} -> {calibration['flagged_share_held_out_after']:.1%} "
                f"on {calibration['held_out']} held out" if calibration else "no (the artifact's, set at 32 px)")),
        ])
    demo.finish(work, args.keep or args.workdir is not None, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
