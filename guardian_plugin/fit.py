"""Does the detector fit the model it guards? The artifact records what it was trained for (image
channels and size, the victim's normalisation, the class count); the served model is probed for what
it takes and returns, and a mismatch is refused before the guard serves a single request.

What counts as a mismatch (``check_fit``; the detector's ``to_pixels`` decides what it can adapt):

- class count: the artifact's ``num_classes`` differs from the model's (old artifacts without it:
  unchecked). A detector trained for another model's output guards the wrong model.
- channels: they differ and are not 1 and 3 (grey <-> RGB is averaged or repeated, as ``fit_size``
  does); or the input mapping has a mean/std count other than 1 or the model's channel count.
- normalisation: the model's measured per-channel mean/std differ from the artifact's input mapping
  (mean by more than 0.01, std by more than 1%): ``to_pixels`` would turn the model's input into
  wrong pixels.
- spatial size: smaller than the detector's on either side (upsampling would show the detector
  blurred images it never saw); or, with ``input.fit: center_crop``, larger than
  ``MAX_CROP_RATIO`` (4) times the detector's on either side: the crop would be a small patch at another
  scale than the detector was trained on. With ``fit: resize`` or ``area`` any larger input is
  scaled down and fits.

``allow_mismatch`` (``allow_mismatch: true`` in the guard config, ``guardian protect
--allow-mismatch``) logs the same message as a warning and proceeds.

``probe_handler`` measures a TorchServe handler the way TorchServe uses it: two uniform grey PNGs
(levels 64 and 192, of a given size) in one request batch through the handler's own ``preprocess``
and ``inference``; RGB first, grey-scale if RGB fails. The preprocessed tensor gives the input shape
and, from the two grey levels, the per-channel mean and std of an affine normalisation; the inference
output gives the class count. A handler that does not resize reports the probe's own size (the
detector's, when ``verify_handler_fit`` probes): clients sending other sizes are then fitted by the
detector's ``fit`` at run time.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from typing import List, Optional

import torch

from guardian_plugin.errors import ModelMismatch

log = logging.getLogger("guardian_plugin")

MAX_CROP_RATIO = 4
MEAN_TOL, STD_RTOL = 0.01, 0.01
PROBE_LEVELS = (64, 192)
OVERRIDE_HINT = ("set `allow_mismatch: true` in the guard config (or pass --allow-mismatch to `guardian protect`) "
                 "to proceed anyway")


@dataclass
class ModelSpec:
    """What a served model takes (its preprocessed input) and returns."""

    channels: int
    height: int
    width: int
    num_classes: int
    mean: Optional[List[float]] = None  # per channel, when measured: input = (pixel - mean) / std
    std: Optional[List[float]] = None

    def describe(self) -> str:
        return f"the model takes {self.channels}x{self.height}x{self.width} inputs and returns {self.num_classes} classes"


def _detector_shape(spec) -> str:
    s = spec.image.size
    classes = f"{spec.num_classes} classes" if spec.num_classes is not None else "any class count (not recorded)"
    return f"detector trained for {spec.image.channels}x{s}x{s} inputs, {classes}"


def _per_channel(values: List[float], c: int) -> List[float]:
    return list(values) * c if len(values) == 1 else list(values)


def fit_problems(spec, model: ModelSpec) -> List[str]:
    """Every way the detector (a DetectorSpec) does not fit the model; empty when it fits."""
    problems = []
    if spec.num_classes is not None and spec.num_classes != model.num_classes:
        problems.append(f"class count {model.num_classes} != {spec.num_classes}")
    dc, mc = spec.image.channels, model.channels
    if dc != mc and {dc, mc} != {1, 3}:
        problems.append(f"{mc} input channels cannot be mapped to the detector's {dc}")
    m = spec.input
    if len(m.mean) not in (1, mc) or len(m.std) not in (1, mc):
        problems.append(f"the input mapping has {len(m.mean)} means / {len(m.std)} stds for {mc} channels")
    elif model.mean is not None and model.std is not None and len(model.mean) == mc:
        dmean, dstd = _per_channel(m.mean, mc), _per_channel(m.std, mc)
        if any(abs(a - b) > MEAN_TOL for a, b in zip(model.mean, dmean)) or \
                any(abs(a - b) > STD_RTOL * b for a, b in zip(model.std, dstd)):
            problems.append(f"the model normalises with mean {_r(model.mean)} std {_r(model.std)}, the detector's "
                            f"input mapping assumes mean {_r(m.mean)} std {_r(m.std)}")
    s, h, w = spec.image.size, model.height, model.width
    if min(h, w) < s:
        problems.append(f"inputs smaller than the detector's {s}x{s} would be upsampled")
    elif m.fit == "center_crop" and max(h, w) > MAX_CROP_RATIO * s:
        problems.append(f"a {s}x{s} center crop of a {h}x{w} input is a patch at another scale than the detector "
                        f"was trained on (input.fit: center_crop allows up to {MAX_CROP_RATIO}x the detector's size)")
    return problems


def _r(values) -> List[float]:
    return [round(float(v), 4) for v in values]


def check_fit(spec, model: ModelSpec, allow_mismatch: bool = False) -> List[str]:
    """Raise ModelMismatch naming both shapes when the detector (a DetectorSpec) does not fit ``model``;
    with ``allow_mismatch`` log it as a warning instead. Returns the problems (empty: it fits)."""
    problems = fit_problems(spec, model)
    if problems:
        msg = f"{_detector_shape(spec)}; {model.describe()}: {'; '.join(problems)}"
        if not allow_mismatch:
            raise ModelMismatch(f"{msg}. Use a detector trained for this model, or {OVERRIDE_HINT}")
        log.warning("guardian: allow_mismatch is set, guarding anyway: %s", msg)
    return problems


def probe_image(level: int, size: int, mode: str = "RGB") -> bytes:
    """A uniform grey PNG, as a client sends it."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, (size, size), (level,) * 3 if mode == "RGB" else level).save(buf, "PNG")
    return buf.getvalue()


def probe_handler(handler, size: int = 64) -> ModelSpec:
    """Run an initialised TorchServe handler's own preprocess and inference on synthetic images (see
    the module docstring) and read what the model takes and returns. ModelMismatch when neither an RGB
    nor a grey-scale image gets through."""
    errors = []
    for mode in ("RGB", "L"):
        batch = [{"body": bytearray(probe_image(v, size, mode))} for v in PROBE_LEVELS]
        try:
            x = handler.preprocess(batch)
            out = handler.inference(x)
        except Exception as e:  # noqa: BLE001  (the next image mode, or the error below)
            errors.append(f"{mode}: {type(e).__name__}: {e}")
            continue
        if not (isinstance(x, torch.Tensor) and x.dim() == 4 and isinstance(out, torch.Tensor) and out.dim() == 2):
            raise ModelMismatch("cannot probe the model: its handler must preprocess images into a (batch, C, H, W) "
                                f"tensor and infer (batch, classes); got {_shape(x)} -> {_shape(out)}")
        return ModelSpec(int(x.shape[1]), int(x.shape[2]), int(x.shape[3]), int(out.shape[1]),
                         *_normalisation(x.detach().float().cpu()))
    raise ModelMismatch(f"cannot probe the model with a grey {size}x{size} PNG ({'; '.join(errors)}); {OVERRIDE_HINT}")


def _shape(v) -> str:
    return f"tensor {tuple(v.shape)}" if isinstance(v, torch.Tensor) else type(v).__name__


def _normalisation(x: torch.Tensor):
    """(mean, std) per channel of an affine input normalisation, from the two grey probes; (None, None)
    when the preprocessed values do not follow the pixel level."""
    lo, hi = (v / 255.0 for v in PROBE_LEVELS)
    a, b = x[0].mean((1, 2)), x[1].mean((1, 2))
    if bool(((b - a).abs() < 1e-6).any()):
        return None, None
    std = (hi - lo) / (b - a)
    return (lo - a * std).tolist(), std.tolist()


def verify_handler_fit(inner_handler, detector, cfg) -> Optional[ModelSpec]:
    """At worker load: probe the guarded handler and check the detector fits it (``cfg.allow_mismatch``
    turns a mismatch, or a model that cannot be probed, into a logged warning)."""
    try:
        model = probe_handler(inner_handler, size=detector.spec.image.size)
    except ModelMismatch as e:
        if not cfg.allow_mismatch:
            raise
        log.warning("guardian: allow_mismatch is set, guarding unchecked: %s", e)
        return None
    check_fit(detector.spec, model, cfg.allow_mismatch)
    log.info("guardian: the detector fits: %s", model.describe())
    return model
