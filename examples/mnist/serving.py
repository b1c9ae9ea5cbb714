"""The MNIST example over TorchServe, shared by the demo, the TorchServe tests and the benchmark:
real and generator-synthesised query images as a client sends them, and the pieces of the archives."""

from __future__ import annotations

import io
import json
import os
import shutil

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from PIL import Image

from examples.torchserve_demo import png  # noqa: F401 (part of this module's interface)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARTIFACTS = os.path.join(ROOT, "examples", "mnist", "artifacts")
DETECTOR = os.environ.get("GUARDIAN_TEST_DETECTOR") or os.path.join(ARTIFACTS, "detector")
VICTIM_TS = os.path.join(ARTIFACTS, "victim.torchscript.pt")
MNIST_HANDLER = os.path.join(ROOT, "examples", "mnist", "mnist_handler.py")
MNIST_LABEL_HANDLER = os.path.join(ROOT, "examples", "mnist", "mnist_label_handler.py")  # answers labels only
MNIST_MEAN, MNIST_STD = [0.1307], [0.3081]
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def real_digits(n: int, offset: int = 0):
    """(PNG bytes list, labels) of held-out MNIST test digits."""
    from guardian_plugin.training.data import mnist_splits

    x, y = mnist_splits()["test"]
    return [png(x[i, 0]) for i in range(offset, offset + n)], [int(v) for v in y[offset:offset + n]]


def generator_images(n: int, seed: int = 0, bn_eval: bool = False) -> list:
    """PNG bytes of DFME-generator (GeneratorA) outputs, mapped from the victim's normalised space to
    8-bit pixels as an attacker's HTTP client sends them. ``bn_eval``: the untrained generator with its
    BatchNorm layers in eval mode (images the per-sample detector does not flag)."""
    from guardian_plugin.nets import GeneratorA

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    gen = GeneratorA(nz=256, channels=1, size=28).train(not bn_eval)
    with torch.no_grad():
        x = gen(torch.randn(max(n, 2), 256, generator=g))[:n]
    pix = (x * MNIST_STD[0] + MNIST_MEAN[0]).clamp(0, 1)
    a = (pix * 255).round().to(torch.uint8).numpy()
    return [png(a[i, 0]) for i in range(n)]


PAD_PLACES = ("top_left", "bottom_right", "center")


def pad_to(a: np.ndarray, size: int, where: str = "top_left") -> np.ndarray:
    """``a`` (uint8, ... x 28 x 28) padded with background (0) to ``size`` x ``size`` on its last two axes:
    the extra rows and columns before the digit (``top_left``), after it, or split (``center``, the odd one
    after). What a client of the MNIST example sending 29-31 px images sends (the victim takes 28-31 px)."""
    if where not in PAD_PLACES:
        raise ValueError(f"where must be one of {PAD_PLACES}, not {where!r}")
    k = size - a.shape[-1]
    before = {"top_left": k, "bottom_right": 0, "center": k // 2}[where]
    return np.pad(a, [(0, 0)] * (a.ndim - 2) + [(before, k - before)] * 2)


def padded_png(png_bytes: bytes, size: int, where: str = "top_left") -> bytes:
    """A grayscale PNG request body padded to ``size`` x ``size`` (pad_to)."""
    return png(pad_to(np.array(Image.open(io.BytesIO(png_bytes)).convert("L")), size, where))


def as_input(a: np.ndarray) -> torch.Tensor:
    """uint8 digits (N, H, W) -> the victim's normalised input (N, 1, H, W), as its handler makes it."""
    x = torch.from_numpy(np.ascontiguousarray(a)).float().div(255.0)[:, None]
    return (x - MNIST_MEAN[0]) / MNIST_STD[0]


def decode_pngs(bodies) -> np.ndarray:
    """Grayscale PNG request bodies -> uint8 (N, H, W)."""
    return np.stack([np.array(Image.open(io.BytesIO(b)).convert("L")) for b in bodies])


def stream(guardian, victim, x: torch.Tensor, client: str, batch: int = 10):
    """One client sending ``x`` (victim inputs) ``batch`` rows a request through ``guardian`` in process,
    as the evaluation harness does (attacks.target.EvalTarget: admission, inference, inspection), until
    refused or done. Returns the target: ``refused_at``, ``flagged`` (per-sample detector), answers."""
    from guardian_plugin.attacks.target import EvalTarget, QueryRefused

    t = EvalTarget(victim, 10, guardian, client_id=client)
    for i in range(0, len(x), batch):
        try:
            t.query(x[i:i + batch])
        except QueryRefused:
            break
    return t


def to_rgb(png_bytes: bytes) -> bytes:
    """A 28 px grayscale digit as the 256 px RGB image an ImageNet-style client sends (padded to 32 px,
    scaled 8x): ImageClassifier's Resize(256) + CenterCrop(224) then shows the model the 28 px digit,
    scaled 8x, with no resampling blur."""
    a = np.array(Image.open(io.BytesIO(png_bytes)).convert("RGB"))
    a = np.pad(a, ((2, 2), (2, 2), (0, 0))).repeat(8, 0).repeat(8, 1)
    return png(a)


class ImageNetInputDigits(nn.Module):
    """The MNIST victim behind an ImageNet-style input (3 x 224 x 224, ImageNet normalisation), so that
    TorchServe's built-in ``image_classifier`` handler can serve it unchanged."""

    def __init__(self, victim: nn.Module):
        super().__init__()
        self.victim = victim
        self.register_buffer("in_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("in_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, x):
        pix = (x * self.in_std + self.in_mean).mean(1, keepdim=True)
        pix = F.interpolate(pix, size=(28, 28), mode="area")  # 224 = 8 x 28: block averages
        return self.victim((pix - 0.1307) / 0.3081)


def imagenet_victim(path: str) -> str:
    victim = torch.jit.load(VICTIM_TS, map_location="cpu").eval()
    m = ImageNetInputDigits(victim).eval()
    traced = torch.jit.trace(m, torch.zeros(1, 3, 224, 224))
    traced.save(path)
    return path


def imagenet_detector(src: str, dst: str) -> str:
    """A copy of the detector artifact whose input mapping reads ImageNet-normalised 224 px inputs."""
    shutil.copytree(src, dst, dirs_exist_ok=True)
    p = os.path.join(dst, "detector.yaml")
    with open(p) as f:
        spec = yaml.safe_load(f)
    spec["input"] = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "fit": "area"}
    with open(p, "w") as f:
        yaml.safe_dump(spec, f, sort_keys=False)
    return dst


def guard_yaml(path: str, ledger: str, tau: int, rho: float = 0.5, missing: str = "anonymous") -> str:
    with open(path, "w") as f:
        yaml.safe_dump({"ledger": ledger, "rule": {"tau": tau, "rho": rho},
                        "identity": {"headers": ["X-Client-Id"], "missing": missing}}, f)
    return path


def topk(resp) -> list:
    """[(label, probability), ...] in the response's order."""
    return list(json.loads(resp.text).items())
