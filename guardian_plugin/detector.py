"""DFMS-Detector: sub-detectors on gradient representations, the OR ensemble, and the artifact.

An artifact is one directory:
  detector.yaml      format version, image format, input mapping, the victim's class count, transforms,
                     sub-detectors + thresholds (guardian_plugin.fit checks the first three against a model)
  *.pt               state dicts (sub-detectors, the discriminator transform) or TorchScript (victim)
  report.json        what training measured (optional for loading)
  roc.png            ROC curves (optional)
Thresholds apply to each sub-detector's logit: a sample is flagged when ANY logit >= its threshold.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from pydantic import BaseModel, Field, field_validator

from guardian_plugin.errors import ArtifactError
from guardian_plugin.nets import build_classifier
from guardian_plugin.transform import TransformContext, TransformModel, build_transform
from guardian_plugin.weights import load_into

FORMAT_VERSION = 1
DETECTOR_YAML = "detector.yaml"


# ------------------------------------------------------------------------------- artifact schema
class ImageSpec(BaseModel):
    channels: int = Field(1, ge=1, le=4)
    size: int = Field(28, ge=8, le=1024)


INPUT_FITS = ("center_crop", "resize", "area")  # InputMapping.fit's values


class InputMapping(BaseModel):
    """How a served model's preprocessed tensor maps back to [0, 1] pixels: x * std + mean."""

    mean: List[float] = [0.0]
    std: List[float] = [1.0]
    fit: str = "center_crop"  # or "resize" (bilinear, antialiased) or "area" (block average): how a
    # larger input meets the detector's size

    @field_validator("std")
    @classmethod
    def _positive(cls, v):
        if any(s <= 0 for s in v):
            raise ValueError("every std must be > 0")
        return v

    @field_validator("fit")
    @classmethod
    def _fit(cls, v):
        if v not in INPUT_FITS:
            raise ValueError(f"fit must be one of {', '.join(INPUT_FITS)}")
        return v


class SubDetectorSpec(BaseModel):
    name: str
    source: str = ""
    transform: str
    arch: str = "small_resnet"
    arch_params: Dict = {}
    weights: str
    threshold: float = 0.0


class DetectorSpec(BaseModel):
    format_version: int
    image: ImageSpec = ImageSpec()
    input: InputMapping = InputMapping()
    num_classes: Optional[int] = Field(None, ge=1)  # the victim's; None (older artifacts): unchecked
    target_fpr: float = 0.01
    transforms: Dict[str, Dict] = {}
    subdetectors: List[SubDetectorSpec]

    @field_validator("format_version")
    @classmethod
    def _version(cls, v):
        if v != FORMAT_VERSION:
            raise ValueError(f"format_version {v} is not supported (this version reads {FORMAT_VERSION})")
        return v

    @field_validator("subdetectors")
    @classmethod
    def _nonempty(cls, v):
        if not v:
            raise ValueError("at least one sub-detector is needed")
        return v


# ----------------------------------------------------------------------------------- modules
class SubDetector(nn.Module):
    """A binary classifier on representations in [0, 255]; returns one logit per sample (>0: fake)."""

    def __init__(self, arch: str, channels: int, image_size: int, **arch_params):
        super().__init__()
        self.net = build_classifier(arch, in_channels=channels, num_classes=1, image_size=image_size, **arch_params)

    def forward(self, rep: torch.Tensor) -> torch.Tensor:
        return self.net(rep / 127.5 - 1.0).squeeze(1)


class Detector(nn.Module):
    """The ensemble. ``scores`` computes each distinct transform's representation once per batch."""

    def __init__(self, spec: DetectorSpec, transforms: Dict[str, TransformModel], subs: Sequence[SubDetector]):
        super().__init__()
        self.spec = spec
        self.transforms = nn.ModuleDict(transforms)
        self.subs = nn.ModuleList(subs)
        self.register_buffer("thresholds", torch.tensor([s.threshold for s in spec.subdetectors], dtype=torch.float32))
        self.eval()

    @property
    def names(self) -> List[str]:
        return [s.name for s in self.spec.subdetectors]

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """A served model's preprocessed batch -> [0, 1] pixel images of the detector's size."""
        m = self.spec.input
        c = x.shape[1]
        mean = torch.tensor(m.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(m.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        if mean.shape[1] not in (1, c) or std.shape[1] not in (1, c):
            raise ValueError(f"input mapping has {mean.shape[1]} means / {std.shape[1]} stds for {c} channels")
        pix = (x * std + mean).clamp(0.0, 1.0)
        return self.fit_size(pix)

    def fit_size(self, pix: torch.Tensor) -> torch.Tensor:
        want_c, size = self.spec.image.channels, self.spec.image.size
        if pix.shape[1] != want_c:
            if want_c == 1:
                pix = pix.mean(1, keepdim=True)
            elif pix.shape[1] == 1:
                pix = pix.expand(-1, want_c, -1, -1)
            else:
                raise ValueError(f"cannot map {pix.shape[1]} channels to the detector's {want_c}")
        h, w = pix.shape[-2:]
        if (h, w) == (size, size):
            return pix
        if self.spec.input.fit == "center_crop" and h >= size and w >= size:
            top, left = (h - size) // 2, (w - size) // 2
            return pix[..., top:top + size, left:left + size]
        if self.spec.input.fit == "area":
            return F.interpolate(pix, size=(size, size), mode="area")
        return F.interpolate(pix, size=(size, size), mode="bilinear", align_corners=False, antialias=True)

    def representations(self, pix: torch.Tensor) -> Dict[str, torch.Tensor]:
        needed = {s.transform for s in self.spec.subdetectors}
        return {name: self.transforms[name](pix) for name in needed}

    @torch.no_grad()
    def logits_from_reps(self, reps: Dict[str, torch.Tensor]) -> torch.Tensor:
        cols = [sub(reps[spec.transform]) for sub, spec in zip(self.subs, self.spec.subdetectors)]
        return torch.stack(cols, 1)

    def scores(self, pix: torch.Tensor) -> torch.Tensor:
        """(B, K) logits for [0, 1] pixel images of the detector's size."""
        return self.logits_from_reps(self.representations(pix))

    def flag(self, pix: torch.Tensor):
        """(flagged (B,) bool, scores (B, K)) for [0, 1] pixel images."""
        s = self.scores(pix)
        return (s >= self.thresholds.to(s.device)).any(1), s


# ------------------------------------------------------------------------------- load / save
def read_spec(directory: str) -> DetectorSpec:
    """The artifact's detector.yaml, validated (ArtifactError naming the file otherwise)."""
    path = os.path.join(directory, DETECTOR_YAML)
    if not os.path.isdir(directory):
        raise ArtifactError(f"detector artifact {directory} is not a directory")
    if not os.path.exists(path):
        raise ArtifactError(f"{path} is missing: not a detector artifact")
    from guardian_plugin.config import read_yaml, validate

    return validate(DetectorSpec, read_yaml(path, ArtifactError, "detector file"), path, ArtifactError)


def load_detector(directory: str, device: str | torch.device = "cpu", victim: Optional[nn.Module] = None) -> Detector:
    """Load an artifact directory; every missing or corrupt file raises ArtifactError naming it."""
    spec = read_spec(directory)
    ctx = TransformContext(spec.image.channels, spec.image.size, artifact_dir=directory, victim=victim,
                           victim_mean=spec.input.mean, victim_std=spec.input.std)
    transforms = {}
    for s in spec.subdetectors:
        if s.transform not in transforms:
            transforms[s.transform] = build_transform(s.transform, dict(spec.transforms.get(s.transform, {})), ctx)
    subs = []
    for s in spec.subdetectors:
        sub = SubDetector(s.arch, transforms[s.transform].out_channels or spec.image.channels, spec.image.size,
                          **s.arch_params)
        load_into(sub, os.path.join(directory, s.weights), f"sub-detector {s.name!r}")
        subs.append(sub)
    return Detector(spec, transforms, subs).to(device)


def save_detector(directory: str, spec: DetectorSpec, subs: Sequence[SubDetector]) -> str:
    """Write detector.yaml and the sub-detector weights (transform weights are written by the trainer)."""
    os.makedirs(directory, exist_ok=True)
    for s, sub in zip(spec.subdetectors, subs):
        torch.save(sub.state_dict(), os.path.join(directory, s.weights))
    path = os.path.join(directory, DETECTOR_YAML)
    with open(path, "w") as f:
        yaml.safe_dump(spec.model_dump(), f, sort_keys=False)
    return path
