"""DFMS-Detector: sub-detectors on gradient representations, the OR ensemble, and the artifact.

An artifact is one directory:
  detector.yaml      format version, image format, input mapping, the victim's class count, transforms,
                     sub-detectors + thresholds (guardian_plugin.fit checks the first three against a model)
  *.pt               state dicts (sub-detectors, shared trunks and their heads, the discriminator
                     transform) or TorchScript (victim)
  report.json        what training measured (optional for loading)
  roc.png            ROC curves (optional)
Thresholds apply to each sub-detector's logit: a sample is flagged when ANY logit >= its threshold.

Two optional keys (format_version 2; an artifact without them is version 1, read as it always was):
  patches {size, grid}  every sub-detector sees size x size crops of the representation at a fixed
                        grid x grid lattice (corners included) and scores the image by the MEAN of its
                        patch logits: native-resolution artefacts at the cost of small images
  trunks {name: {transform, arch, arch_params, weights}}  one feature trunk per transform, shared by the
                        sub-detectors whose ``trunk`` names it; each of those is a linear head
                        (``arch: linear``), one trunk pass per transform per batch
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from pydantic import BaseModel, Field, field_validator, model_validator

from guardian_plugin.errors import ArtifactError, ConfigError
from guardian_plugin.nets import FusedSmallResNets, build_classifier, build_trunk, fold_batchnorm
from guardian_plugin.transform import TransformContext, TransformModel, build_transform
from guardian_plugin.weights import load_into

READS_VERSIONS = (1, 2)     # version 1: neither key (every artifact written before them)
DETECTOR_YAML = "detector.yaml"
HEAD_ARCH = "linear"        # the `arch` of a sub-detector that is a head on a shared trunk

# The shipped default detector shape for 224 x 224 inputs (issue #14), in DetectorTrain's keys: the NPR
# residual of the whole image, 32 px patches on a 3 x 3 lattice, one small_resnet trunk shared by one
# linear head per source. Chosen by cost (benchmarks/guard_cost.py measures it beside a ResNet-50);
# docs/detector.md ("Patches and a shared trunk") says what it costs and what it sees.
DEFAULT_224 = {"transform": "npr", "patch": {"size": 32, "grid": 3}, "shared_trunk": True,
               "arch": "small_resnet", "arch_params": {"width": 8, "blocks": 1}}


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
    arch: str = "small_resnet"     # `linear` for a head on a shared trunk
    arch_params: Dict = {}
    weights: str
    threshold: float = 0.0
    trunk: Optional[str] = None    # the `trunks` entry this sub-detector is a linear head on


class PatchSpec(BaseModel):
    """``size`` x ``size`` crops at a ``grid`` x ``grid`` lattice of positions (see :func:`patch_positions`)."""

    size: int = Field(..., ge=4)
    grid: int = Field(3, ge=1, le=16)


class TrunkSpec(BaseModel):
    """A feature trunk shared by the sub-detectors on ``transform``: ``arch`` without its last layer."""

    transform: str
    arch: str = "small_resnet"
    arch_params: Dict = {}
    weights: str


class DetectorSpec(BaseModel):
    format_version: int
    image: ImageSpec = ImageSpec()
    input: InputMapping = InputMapping()
    num_classes: Optional[int] = Field(None, ge=1)  # the victim's; None (older artifacts): unchecked
    target_fpr: float = 0.01
    transforms: Dict[str, Dict] = {}
    patches: Optional[PatchSpec] = None
    trunks: Dict[str, TrunkSpec] = {}
    subdetectors: List[SubDetectorSpec]

    @field_validator("format_version")
    @classmethod
    def _version(cls, v):
        if v not in READS_VERSIONS:
            raise ValueError(f"format_version {v} is not supported (this version reads "
                             f"{', '.join(map(str, READS_VERSIONS))})")
        return v

    @field_validator("subdetectors")
    @classmethod
    def _nonempty(cls, v):
        if not v:
            raise ValueError("at least one sub-detector is needed")
        return v

    @model_validator(mode="after")
    def _new_keys(self):
        if self.format_version < format_version_for(self.patches, self.trunks):
            raise ValueError("format_version: `patches` and `trunks` need format_version 2 (a reader of version 1 "
                             "would ignore them and score wrongly)")
        if self.patches is not None and self.patches.size > self.image.size:
            raise ValueError(f"patches.size: {self.patches.size} px patches do not fit {self.image.size} px images")
        used = set()
        for i, s in enumerate(self.subdetectors):
            if s.trunk is None:
                if s.arch == HEAD_ARCH:
                    raise ValueError(f"subdetectors.{i}.arch: {HEAD_ARCH!r} is a head and needs `trunk:`")
                continue
            if s.trunk not in self.trunks:
                raise ValueError(f"subdetectors.{i}.trunk: {s.trunk!r} is not in trunks ({', '.join(self.trunks) or 'none'})")
            if self.trunks[s.trunk].transform != s.transform:
                raise ValueError(f"subdetectors.{i}.transform: {s.transform!r}, but its trunk {s.trunk!r} runs on "
                                 f"{self.trunks[s.trunk].transform!r}")
            if s.arch != HEAD_ARCH:
                raise ValueError(f"subdetectors.{i}.arch: a head on a trunk is {HEAD_ARCH!r}, not {s.arch!r}")
            used.add(s.trunk)
        unused = sorted(set(self.trunks) - used)
        if unused:
            raise ValueError(f"trunks.{unused[0]}: no sub-detector uses it")
        return self

    @property
    def subdetector_size(self) -> int:
        """The side of what each sub-detector (or trunk) sees: a patch, or the whole image."""
        return self.patches.size if self.patches is not None else self.image.size


def format_version_for(patches: Optional[PatchSpec], trunks: Dict) -> int:
    """The oldest format that holds these settings: 1 without patches or trunks (what every earlier
    version reads), else 2, so an older reader refuses the artifact instead of ignoring the keys."""
    return 2 if patches is not None or trunks else 1


def patch_positions(image_size: int, patch: int, grid: int) -> List[int]:
    """``grid`` offsets along one side, evenly spread over [0, image_size - patch] with both ends
    included (the corners); a grid of 1 is the centre."""
    span = image_size - patch
    if grid == 1:
        return [span // 2]
    return [i * span // (grid - 1) for i in range(grid)]


def patch_lattice(image_size: int, patch: int, grid: int) -> List[Tuple[int, int]]:
    """The (top, left) of every patch, row by row."""
    pos = patch_positions(image_size, patch, grid)
    return [(t, l) for t in pos for l in pos]


def lattice_patches(x: torch.Tensor, lattice: Sequence[Tuple[int, int]], size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B * N, C, size, size): each image's N lattice patches, image by image."""
    return torch.stack([x[:, :, t:t + size, l:l + size] for t, l in lattice], 1).flatten(0, 1)


# ----------------------------------------------------------------------------------- modules
class SubDetector(nn.Module):
    """A binary classifier on representations in [0, 255]; returns one logit per sample (>0: fake)."""

    def __init__(self, arch: str, channels: int, image_size: int, **arch_params):
        super().__init__()
        self.net = build_classifier(arch, in_channels=channels, num_classes=1, image_size=image_size, **arch_params)

    @staticmethod
    def scale(rep: torch.Tensor) -> torch.Tensor:
        """Representations in [0, 255] -> the networks' input range [-1, 1]."""
        return rep / 127.5 - 1.0

    def forward(self, rep: torch.Tensor) -> torch.Tensor:
        return self.net(self.scale(rep)).squeeze(1)


class Trunk(nn.Module):
    """The features shared by the heads on one transform: representations in [0, 255] -> (B, F)."""

    def __init__(self, arch: str, channels: int, image_size: int, **arch_params):
        super().__init__()
        self.net = build_trunk(arch, in_channels=channels, image_size=image_size, **arch_params)
        self.out_features = self.net.out_features

    def forward(self, rep: torch.Tensor) -> torch.Tensor:
        return self.net(SubDetector.scale(rep))


class Head(nn.Module):
    """One source's linear head on a trunk's features; one logit per sample (>0: fake)."""

    def __init__(self, features: int):
        super().__init__()
        self.fc = nn.Linear(features, 1)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.fc(feats).squeeze(1)


class Detector(nn.Module):
    """The ensemble. ``scores`` computes each distinct transform's representation once per batch, its
    patches once (``patches``) and each shared trunk once, all of its heads in one matrix product."""

    def __init__(self, spec: DetectorSpec, transforms: Dict[str, TransformModel], subs: Sequence[nn.Module],
                 trunks: Optional[Dict[str, Trunk]] = None, fast: Optional[bool] = None):
        super().__init__()
        self.spec = spec
        self.transforms = nn.ModuleDict(transforms)
        self.subs = nn.ModuleList(subs)
        self.trunks = nn.ModuleDict(trunks or {})
        self.register_buffer("thresholds", torch.tensor([s.threshold for s in spec.subdetectors], dtype=torch.float32))
        self._needed = list(dict.fromkeys(s.transform for s in spec.subdetectors))
        self._mean_std_cache: Dict[tuple, Tuple[torch.Tensor, torch.Tensor]] = {}
        self._heads = {t: [i for i, s in enumerate(spec.subdetectors) if s.trunk == t] for t in self.trunks}
        self._alone = [i for i, s in enumerate(spec.subdetectors) if s.trunk is None]
        p = spec.patches
        self._lattice = patch_lattice(spec.image.size, p.size, p.grid) if p is not None else None
        # ``fast`` (the default) runs inference copies: every batch norm folded into its convolution,
        # channels-last (measured faster on CPU for these small networks: benchmarks/guard_cost.py), the
        # heads on one trunk as one matrix product, independent sub-detectors of one SmallResNet shape on
        # one transform as one network of grouped convolutions (nets.FusedSmallResNets), and a local
        # transform on the pixel patches only (``_patches_first``). These round differently from the saved
        # modules (scores within about 1e-5); ``fast=False`` runs the saved modules as they are.
        # The copies are made here, from trained modules; ``subs`` / ``trunks`` stay what is saved.
        self._fast = True if fast is None else fast
        if self._fast:
            self._build_fast_copies()
        self.eval()

    def _build_fast_copies(self) -> None:
        """The inference copies ``fast`` runs (see __init__)."""
        cl = torch.channels_last
        specs = self.spec.subdetectors
        groups: Dict[tuple, List[int]] = {}
        for i in self._alone:
            s = specs[i]
            groups.setdefault((s.transform, s.arch, repr(sorted(s.arch_params.items()))), []).append(i)
        fused_idx = [idx for idx in groups.values() if FusedSmallResNets.fusable([self.subs[i].net for i in idx])]
        self._fused_idx = fused_idx
        self.fused = nn.ModuleList([FusedSmallResNets([self.subs[i].net for i in idx]) for idx in fused_idx]).to(memory_format=cl)
        in_fused = {i for idx in fused_idx for i in idx}
        self.fast_subs = nn.ModuleDict({str(i): fold_batchnorm(self.subs[i]) for i in self._alone if i not in in_fused}).to(memory_format=cl)
        self.fast_trunks = nn.ModuleDict({t: fold_batchnorm(m) for t, m in self.trunks.items()}).to(memory_format=cl)
        heads = {}
        for t, idx in self._heads.items():
            fc = self.subs[idx[0]].fc
            h = nn.Linear(fc.in_features, len(idx), device=fc.weight.device, dtype=fc.weight.dtype)
            with torch.no_grad():
                h.weight.copy_(torch.cat([self.subs[i].fc.weight for i in idx]))
                h.bias.copy_(torch.cat([self.subs[i].fc.bias for i in idx]))
            heads[t] = h.requires_grad_(False)
        self.fast_heads = nn.ModuleDict(heads)

    @property
    def names(self) -> List[str]:
        return [s.name for s in self.spec.subdetectors]

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """A served model's preprocessed batch -> [0, 1] pixel images of the detector's size."""
        c = x.shape[1]
        mean, std = self._mean_std(x.dtype, x.device)
        if mean.shape[1] not in (1, c) or std.shape[1] not in (1, c):
            raise ValueError(f"input mapping has {mean.shape[1]} means / {std.shape[1]} stds for {c} channels")
        pix = (x * std).add_(mean).clamp_(0.0, 1.0)  # (x * std + mean) clamped, two fewer allocations
        return self.fit_size(pix)

    def pixel_range(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The lowest and highest pixel value per row of a served model's preprocessed batch under the
        input mapping (``x * std + mean``, before :meth:`to_pixels` clamps to [0, 1]), without a copy of
        the batch: per-channel extremes of ``x`` mapped."""
        mean, std = self._mean_std(x.dtype, x.device)
        lo = x.amin(dim=(2, 3), keepdim=True) * std + mean
        hi = x.amax(dim=(2, 3), keepdim=True) * std + mean
        return lo.flatten(1).amin(1), hi.flatten(1).amax(1)

    def _mean_std(self, dtype, device) -> Tuple[torch.Tensor, torch.Tensor]:
        """The input mapping's mean and std as (1, C, 1, 1) tensors, made once per dtype and device."""
        cache = self._mean_std_cache
        key = (dtype, device)
        if key not in cache:
            m = self.spec.input
            cache[key] = (torch.tensor(m.mean, dtype=dtype, device=device).view(1, -1, 1, 1),
                          torch.tensor(m.std, dtype=dtype, device=device).view(1, -1, 1, 1))
        return cache[key]

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

    def _patches_first(self, name: str, size: Tuple[int, int]) -> bool:
        """Whether transform ``name`` may run on the lattice's pixel patches instead of the whole image:
        the same values bit for bit (see TransformModel.crop_alignment: a local T, a pixel-wise
        normalisation, the image, the patches and their offsets all aligned), at a fraction of the
        pixels (9 patches of 32 px are 18% of a 224 px image)."""
        t, p = self.transforms[name], self.spec.patches
        a = t.crop_alignment
        if not self._fast or self._lattice is None or a is None or (t.model is not None and t.normalise != "scale"):
            return False
        return all(n % a == 0 for n in (*size, p.size)) and all(o % a == 0 for pos in self._lattice for o in pos)

    def views_of(self, pix: torch.Tensor) -> Dict[str, torch.Tensor]:
        """What the sub-detectors of each transform see: the whole representation or its (B * N) lattice
        patches, the representation of the whole image and then cut (a transform that commutes with
        aligned crops runs on the pixel patches instead: the same values, fewer pixels)."""
        out, pixel_patches = {}, None
        for name in self._needed:
            if self._patches_first(name, tuple(pix.shape[-2:])):
                if pixel_patches is None:
                    pixel_patches = lattice_patches(pix, self._lattice, self.spec.patches.size)
                out[name] = self._layout(self.transforms[name](pixel_patches))
            else:
                out[name] = self.views(self.transforms[name](pix))
        return out

    def views(self, rep: torch.Tensor) -> torch.Tensor:
        """What the sub-detectors of a representation see: itself, or its (B * N) lattice patches."""
        if self._lattice is not None:
            rep = lattice_patches(rep, self._lattice, self.spec.patches.size)
        return self._layout(rep)

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self._fast else x

    def _image_scores(self, logits: torch.Tensor, batch: int) -> torch.Tensor:
        """Per-view logits -> per-image scores: the mean over an image's patches."""
        return logits if self._lattice is None else logits.view(batch, len(self._lattice), *logits.shape[1:]).mean(1)

    def _logits(self, views: Dict[str, torch.Tensor], batch: int) -> torch.Tensor:
        """(B, K) logits from what each transform's sub-detectors see (``views_of``)."""
        specs = self.spec.subdetectors
        cols: List[Optional[torch.Tensor]] = [None] * len(specs)
        for t, idx in self._heads.items():
            if self._fast:
                feats = self.fast_trunks[t](views[self.spec.trunks[t].transform])
                w, b = self.fast_heads[t].weight, self.fast_heads[t].bias
            else:
                feats = self.trunks[t](views[self.spec.trunks[t].transform])
                w = torch.cat([self.subs[i].fc.weight for i in idx])
                b = torch.cat([self.subs[i].fc.bias for i in idx])
            logits = self._image_scores(F.linear(feats, w, b), batch)  # the heads fused: one (B*N, F) x (F, k) product
            for j, i in enumerate(idx):
                cols[i] = logits[:, j]
        if self._fast:
            for idx, net in zip(self._fused_idx, self.fused):
                logits = self._image_scores(net(SubDetector.scale(views[specs[idx[0]].transform])), batch)
                for j, i in enumerate(idx):
                    cols[i] = logits[:, j]
            for key, net in self.fast_subs.items():
                i = int(key)
                cols[i] = self._image_scores(net(views[specs[i].transform]), batch)
        else:
            for i in self._alone:
                cols[i] = self._image_scores(self.subs[i](views[specs[i].transform]), batch)
        return torch.stack(cols, 1)

    @torch.inference_mode()
    def scores(self, pix: torch.Tensor) -> torch.Tensor:
        """(B, K) logits for [0, 1] pixel images of the detector's size."""
        return self._logits(self.views_of(pix), pix.shape[0])

    @torch.inference_mode()
    def flag(self, pix: torch.Tensor):
        """(flagged (B,) bool, scores (B, K)) for [0, 1] pixel images."""
        s = self.scores(pix)
        thr = self.thresholds if self.thresholds.device == s.device else self.thresholds.to(s.device)
        return (s >= thr).any(1), s


def with_input_fit(spec: "DetectorSpec", fit: str) -> "DetectorSpec":
    """A copy of ``spec`` whose ``input.fit`` is ``fit`` (a ConfigError naming the allowed values)."""
    try:
        return spec.model_copy(update={"input": InputMapping(**{**spec.input.model_dump(), "fit": fit})})
    except ValueError as e:  # pydantic's ValidationError names the allowed values
        raise ConfigError(f"input fit {fit!r}: {e}") from None


def calibrate(cal_scores: Dict[str, np.ndarray], target_fpr: float) -> Tuple[np.ndarray, float, Dict[str, float]]:
    """Per-sub-detector thresholds at one common quantile level ``a`` (each threshold is the
    (1 - a)-quantile of that sub-detector's pooled calibration scores), with ``a`` the largest level at
    which the ensemble's FPR is <= target on EVERY calibration group. Returns (thresholds, a, fpr per group)."""
    pooled = np.concatenate(list(cal_scores.values()))

    def thresholds(a: float) -> np.ndarray:
        return np.quantile(pooled, 1.0 - a, axis=0, method="higher").astype(np.float32)  # as served

    def fprs(thr) -> Dict[str, float]:
        return {g: float((s >= thr).any(1).mean()) for g, s in cal_scores.items()}

    lo, hi = 0.0, target_fpr
    for _ in range(40):
        mid = (lo + hi) / 2
        if max(fprs(thresholds(mid)).values()) <= target_fpr:
            lo = mid
        else:
            hi = mid
    thr = thresholds(lo)
    if lo == 0.0:  # even the maxima flag too much: put each threshold just above its maximum
        thr = np.nextafter(pooled.max(0).astype(np.float32), np.float32(np.inf))
    return thr, lo, fprs(thr)


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


def build_modules(spec: DetectorSpec, transforms: Dict[str, TransformModel]) -> Tuple[List[nn.Module], Dict[str, Trunk]]:
    """The sub-detectors (or heads) and trunks ``spec`` describes, freshly initialised."""
    size = spec.subdetector_size

    def channels(transform: str) -> int:
        return transforms[transform].out_channels or spec.image.channels

    trunks = {name: Trunk(t.arch, channels(t.transform), size, **t.arch_params) for name, t in spec.trunks.items()}
    subs = [Head(trunks[s.trunk].out_features) if s.trunk is not None
            else SubDetector(s.arch, channels(s.transform), size, **s.arch_params) for s in spec.subdetectors]
    return subs, trunks


def load_detector(directory: str, device: str | torch.device = "cpu", victim: Optional[nn.Module] = None) -> Detector:
    """Load an artifact directory; every missing or corrupt file raises ArtifactError naming it."""
    spec = read_spec(directory)
    ctx = TransformContext(spec.image.channels, spec.image.size, artifact_dir=directory, victim=victim,
                           victim_mean=spec.input.mean, victim_std=spec.input.std)
    transforms = {}
    for s in spec.subdetectors:
        if s.transform not in transforms:
            transforms[s.transform] = build_transform(s.transform, dict(spec.transforms.get(s.transform, {})), ctx)
    subs, trunks = build_modules(spec, transforms)
    for name, trunk in trunks.items():
        load_into(trunk, os.path.join(directory, spec.trunks[name].weights), f"trunk {name!r}")
    for s, sub in zip(spec.subdetectors, subs):
        load_into(sub, os.path.join(directory, s.weights), f"sub-detector {s.name!r}")
    return Detector(spec, transforms, subs, trunks).to(device)


def save_detector(directory: str, spec: DetectorSpec, subs: Sequence[nn.Module],
                  trunks: Optional[Dict[str, Trunk]] = None) -> str:
    """Write detector.yaml and the sub-detector and trunk weights (transform weights are written by the
    trainer). Without patches or trunks, detector.yaml has exactly the version-1 keys."""
    os.makedirs(directory, exist_ok=True)
    for s, sub in zip(spec.subdetectors, subs):
        torch.save(_contiguous(sub.state_dict()), os.path.join(directory, s.weights))
    for name, trunk in (trunks or {}).items():
        torch.save(_contiguous(trunk.state_dict()), os.path.join(directory, spec.trunks[name].weights))
    doc = spec.model_dump()
    if doc["patches"] is None:
        del doc["patches"]
    if not doc["trunks"]:
        del doc["trunks"]
    for sub in doc["subdetectors"]:
        if sub["trunk"] is None:
            del sub["trunk"]
    path = os.path.join(directory, DETECTOR_YAML)
    with open(path, "w") as f:
        yaml.safe_dump(doc, f, sort_keys=False)
    return path


def _contiguous(sd: dict) -> dict:
    """A state dict in the default memory format (the detector runs the new shapes channels-last)."""
    return {k: v.contiguous() for k, v in sd.items()}


def untrained_detector(shape: Dict, channels: int, size: int, sources: Sequence[str] = ("dfme", "gan", "diffusion"),
                       transforms: Optional[Dict[str, TransformModel]] = None, fast: Optional[bool] = None) -> Detector:
    """A detector of ``shape`` (DetectorTrain's keys: transform, transform_params, patch, shared_trunk,
    arch, arch_params) with random weights and zero thresholds: what a trained one costs to run
    (benchmarks, tests). ``transforms`` supplies transforms that need weights (an untrained discriminator)."""
    tname = shape.get("transform", "identity")
    if transforms is None or tname not in transforms:
        ctx = TransformContext(channels, size)
        transforms = {**(transforms or {}),
                      tname: build_transform(tname, dict(shape.get("transform_params", {}).get(tname, {})), ctx)}
    patch = shape.get("patch")
    shared = bool(shape.get("shared_trunk"))
    arch, params = shape.get("arch", "small_resnet"), dict(shape.get("arch_params", {}))
    trunks = {tname: TrunkSpec(transform=tname, arch=arch, arch_params=params, weights=f"trunk_{tname}.pt")} if shared else {}
    subs = [SubDetectorSpec(name=s, source=s, transform=tname, weights=f"subdetector_{s}.pt",
                            **({"arch": HEAD_ARCH, "trunk": tname} if shared else {"arch": arch, "arch_params": params}))
            for s in sources]
    patches = PatchSpec(**patch) if patch else None
    spec = DetectorSpec(format_version=format_version_for(patches, trunks), image=ImageSpec(channels=channels, size=size),
                        patches=patches, trunks=trunks, transforms={tname: {}}, subdetectors=subs)
    mods, trunk_mods = build_modules(spec, transforms)
    return Detector(spec, {tname: transforms[tname]}, mods, trunk_mods, fast=fast)
