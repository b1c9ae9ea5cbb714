"""The detector training configuration (``guardian train-detector --config CFG``), validated with
errors that name the file and field. See examples/mnist/detector-config.yaml for a full example."""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Tuple

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from guardian_plugin.config import read_yaml, validate
from guardian_plugin import nuisance
from guardian_plugin.detector import PatchSpec
from guardian_plugin.errors import ConfigError
from guardian_plugin.nuisance import DEFAULT_ENVELOPE
from guardian_plugin.training.augment import AugmentConfig
from guardian_plugin.training.data import CIFAR10_SPLITS, FOOLBOX_GROUPS

REAL_KINDS = ("mnist", "photos", "folder", "cifar10", "foolbox")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RealEntry(_Strict):
    """Real images: ``kind`` mnist (split train|test), photos (group train|calibrate|evaluate, n),
    folder (path), cifar10 (split: one of the named splits of the shared copy, docs/cifar10.md),
    foolbox (group imagenet|cifar100: the 20 samples of the foolbox package, whole)."""

    name: str
    kind: str
    split: Optional[str] = None
    group: Optional[str] = None
    n: Optional[int] = None
    path: Optional[str] = None
    range: Optional[Tuple[int, int]] = None
    seed: int = 0
    # photos only: crop only photos whose shorter side is at least this many pixels (e.g. the image size,
    # so that a 224 px detector never trains on 25 px LFW faces blown up 9x; docs/imagenet.md)
    min_side: Optional[int] = Field(None, ge=1)

    @field_validator("kind")
    @classmethod
    def _kind(cls, v):
        if v not in REAL_KINDS:
            raise ValueError(f"kind must be one of {', '.join(REAL_KINDS)}")
        return v

    @model_validator(mode="after")
    def _split(self):
        if self.kind == "cifar10" and self.split not in CIFAR10_SPLITS:
            raise ValueError(f"split: cifar10 needs one of {', '.join(CIFAR10_SPLITS)} (got {self.split!r})")
        if self.kind == "foolbox" and self.group not in FOOLBOX_GROUPS:
            raise ValueError(f"group: foolbox needs one of {', '.join(FOOLBOX_GROUPS)} (got {self.group!r})")
        if self.min_side is not None and self.kind != "photos":
            raise ValueError(f"min_side applies to kind photos only, not {self.kind}")
        return self


class RealConfig(_Strict):
    train: List[RealEntry]
    calibrate: List[RealEntry]
    evaluate: List[RealEntry]


class SourceEntry(_Strict):
    kind: str
    n: int = Field(3000, ge=10)
    params: Dict = {}


class VictimConfig(_Strict):
    arch: str = "small_resnet"
    arch_params: Dict = {}
    num_classes: int = 10
    weights: str


class TransformTrain(_Strict):
    epochs: int = 10
    width: int = 32
    nz: int = 64
    seed: int = 1


class PatchTrain(PatchSpec):
    """``detector.patch``: sub-detectors on ``size`` x ``size`` patches of the image at native resolution,
    trained on one random crop per image per step, scored by the mean over a ``grid`` x ``grid`` lattice."""

    model_config = ConfigDict(extra="forbid")


class DetectorTrain(_Strict):
    transform: str = "discriminator"
    per_source_transform: Dict[str, str] = {}
    transform_params: Dict[str, Dict] = {}   # e.g. {"torchvision:resnet18": {"weights": "/path.pth"}}
    arch: str = "small_resnet"
    arch_params: Dict = {"width": 16, "blocks": 1}
    epochs: int = Field(15, ge=1)
    batch_size: int = Field(64, ge=2)
    lr: float = Field(1e-3, gt=0)
    lr_step: int = Field(5, ge=1)      # multiply the lr by lr_gamma every lr_step epochs
    lr_gamma: float = Field(0.9, gt=0, le=1)
    augment: AugmentConfig = AugmentConfig()
    seed: Optional[int] = None  # sub-detector training seed; default: the top-level seed
    # precompute: representations are computed ONCE per training image (``precompute_views`` augmented
    # views, the input-space augmentation applied before the transform), and each epoch only crops and
    # flips them. For transforms that cost milliseconds per image (a victim or pretrained gradient):
    # the transform's cost is paid views x images times instead of epochs x images times.
    precompute: bool = False
    precompute_views: int = Field(2, ge=1)
    # patch: {size: P, grid: G}: every sub-detector sees P x P patches of the transformed image instead of
    # the whole image (docs/detector.md, "Patches and a shared trunk"); null: the whole image
    patch: Optional[PatchTrain] = None
    # shared_trunk: the sources that share a transform share one `arch` trunk with a linear head each,
    # trained jointly (one trunk pass per transform at inference instead of one network per source)
    shared_trunk: bool = False


class ServedView(_Strict):
    """What TorchServe's built-in ``image_classifier`` handler does to every image before the model:
    torchvision Resize(``resize``) (shorter side, bilinear, antialiased) then CenterCrop(``crop``)."""

    resize: int = Field(..., ge=1)
    crop: int = Field(..., ge=1)

    @model_validator(mode="after")
    def _crop(self):
        if self.crop > self.resize:
            raise ValueError(f"crop ({self.crop}) must be at most resize ({self.resize}): the crop is cut from "
                             "the resized image")
        return self


class TrainConfig(_Strict):
    seed: int = 0
    device: str = "auto"
    channels: int = 1
    size: int = 28
    mean: List[float]
    std: List[float]
    victim: Optional[VictimConfig] = None
    real: RealConfig
    generative_data: str = Field(..., description="name of the real.train entry the GAN/diffusion sources learn from")
    sources: Dict[str, SourceEntry]
    test_fraction: float = Field(0.2, gt=0, lt=1)
    # synthetic images held out for choosing between settings (transforms, architectures) without
    # touching the test split that is reported
    val_fraction: float = Field(0.0, ge=0, lt=1)
    # JPEG quality of one round trip every synthetic image goes through before training, calibration and
    # evaluation (null: none): set it when the real images are JPEG, or "JPEG means real" is learnt
    synthetic_jpeg: Optional[int] = Field(None, ge=1, le=100)
    discriminator: TransformTrain = TransformTrain()
    detector: DetectorTrain = DetectorTrain()
    target_fpr: float = Field(0.01, gt=0, lt=0.5)
    # the real.calibrate entry the distribution test's benign reference is built on (guardian_plugin.
    # distribution; needs `victim`); default: the first calibrate entry
    reference_group: Optional[str] = None
    # the benign envelope the reference's rates cover: the calibration images as they are and under each of
    # these nuisances (guardian_plugin.nuisance specs; docs/refusal-rule.md)
    reference_envelope: List[str] = Field(default_factory=lambda: list(DEFAULT_ENVELOPE))
    # each nuisance is measured on the first this-many reference images (None: all of them)
    reference_envelope_images: Optional[int] = Field(None, ge=50)
    cache: str = ".cache/guardian"
    # every image of every split (real and synthetic) first goes through the served model's own
    # preprocessing, e.g. {resize: 256, crop: 224} for TorchServe's image_classifier handler; crop = size
    served_view: Optional[ServedView] = None
    # the one command that writes the files this config names but a checkout does not hold (victim weights,
    # image folders), e.g. `python -m examples.imagenet.build --victim-only`: `--check` names it when one is missing
    prepared_by: Optional[str] = None

    @model_validator(mode="after")
    def _names(self):
        if self.served_view is not None and self.served_view.crop != self.size:
            raise ValueError(f"served_view.crop ({self.served_view.crop}) must equal size ({self.size}): the "
                             "detector sees what the model sees, the crop")
        names = [e.name for e in self.real.train]
        if self.generative_data not in names:
            raise ValueError(f"generative_data {self.generative_data!r} is not a real.train entry ({names})")
        if not self.sources:
            raise ValueError("sources: at least one synthetic source is needed")
        cal = [e.name for e in self.real.calibrate]
        if self.reference_group is not None and self.reference_group not in cal:
            raise ValueError(f"reference_group {self.reference_group!r} is not a real.calibrate entry ({cal})")
        try:
            nuisance.check(self.reference_envelope, self.channels)
        except ConfigError as e:
            raise ValueError(f"reference_envelope: {e}") from None
        return self


def load_train_config(path: str) -> Tuple[TrainConfig, str]:
    """(config, directory it was read from): relative paths in it are taken relative to that directory."""
    return validate(TrainConfig, read_yaml(path), path), os.path.dirname(os.path.abspath(path))
