"""The CIFAR-10 victim behind TorchServe's built-in ``image_classifier`` handler (the demo and its test).

That handler preprocesses every image with Resize(256), CenterCrop(224), ToTensor and the ImageNet
normalisation, which cannot be changed without a handler file. The victim takes 32 x 32 inputs with
that same normalisation, so the archived model is a TorchScript wrapper that brings the 3 x 224 x 224
tensor back to 32 x 32 by 7 x 7 block averages (``F.interpolate(mode="area")``; averaging commutes
with the per-channel normalisation, so nothing is re-normalised) and runs the ResNet. The detector is
told the same (``guardian protect --input-fit area``).

What this path costs: a 32 px image is upsampled to 256 (bilinear), its central 224 px kept, i.e. the
central 28 x 28 of the original, and that is averaged back to 32 px: the victim and the detector see a
slightly zoomed, blurred version of the image, not the image. The demo measures what that does to
accuracy and to the detector's false-positive share.
"""

from __future__ import annotations

import json
import os
from typing import List, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from examples.torchserve_demo import ROOT, png

ARTIFACTS = os.path.join(ROOT, "examples", "cifar10", "artifacts")
VICTIM_TS = os.path.join(ARTIFACTS, "victim.torchscript.pt")
DETECTOR = os.path.join(ARTIFACTS, "detector")
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
SIZE = 32
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


class ImageNetInputCifar(nn.Module):
    """The 32 px CIFAR-10 victim behind an ImageNet-style input (3 x 224 x 224, ImageNet normalisation)."""

    def __init__(self, victim: nn.Module, size: int = SIZE):
        super().__init__()
        self.victim = victim
        self.size = size

    def forward(self, x):
        return self.victim(F.interpolate(x, size=(self.size, self.size), mode="area"))


def served_victim(path: str) -> str:
    """Trace the wrapper around the committed TorchScript victim to ``path`` (CPU; TorchServe moves it)."""
    victim = torch.jit.load(VICTIM_TS, map_location="cpu").eval()
    with torch.no_grad():
        traced = torch.jit.trace(ImageNetInputCifar(victim).eval(), torch.zeros(1, 3, 224, 224))
    traced.save(path)
    return path


def index_to_name(path: str) -> str:
    """The archive's index_to_name.json: ImageClassifier answers with class names."""
    with open(path, "w") as f:
        json.dump({str(i): c for i, c in enumerate(CLASSES)}, f)
    return path


def benign_images(n: int) -> Tuple[np.ndarray, List[int]]:
    """The first ``n`` images of the stratified test split: uint8 (n, 3, 32, 32) and labels."""
    from guardian_plugin.training.data import cifar10_split

    x, y = cifar10_split("test", n)
    return x, [int(v) for v in y]


def png_bodies(x: np.ndarray) -> List[bytes]:
    """uint8 (N, 3, H, W) -> one PNG per image, as a client sends them."""
    return [png(np.ascontiguousarray(a.transpose(1, 2, 0))) for a in x]


def handler_preprocess(bodies: List[bytes]) -> torch.Tensor:
    """What the image_classifier handler gives the model for these request bodies: its own transform
    (Resize 256, CenterCrop 224, ToTensor, ImageNet Normalize) on the decoded images."""
    import io

    from PIL import Image
    from ts.torch_handler.image_classifier import ImageClassifier

    return torch.stack([ImageClassifier.image_processing(Image.open(io.BytesIO(b))) for b in bodies])
