"""The StyleGAN (v1) discriminator, state-dict compatible with LGrad's PyTorch weights.

LGrad (chuangchuangtan/LGrad, ``img2gad_pytorch/gen_imggrad.py``) builds its transformation model with
``build_model(gan_type='stylegan', module='discriminator', resolution=256, label_size=0,
image_channels=3)`` from the genforce code base (genforce/genforce, ``models/stylegan_discriminator.py``),
loads ``karras2019stylegan-bedrooms-256x256_discriminator.pth`` (the official TensorFlow LSUN-bedroom
model converted by genforce's ``converters/stylegan_converter.py``) with ``strict=True``, feeds RGB
images resized to 256x256 and normalised to [-1, 1], and differentiates the sum of the (N, 1) scores
with batch size 1 (``transform_img2grad.sh`` passes 1). This module is an independent implementation of
that architecture from those facts; its parameter and buffer names are the ones such a file holds:

  lod                      scalar buffer, level of detail (0 for a fully trained model)
  input{b}.weight/.bias    FromRGB of block b: 1x1 conv, image_channels -> nf(res_b)
  layer{2b}.weight/.bias   3x3 conv nf(res) -> nf(res)                        (blocks above 4x4)
  layer{2b+1}.weight/.bias 3x3 conv nf(res) -> nf(res/2), then 2x downsample  (blocks above 4x4)
  layer{2b+1}.blur.kernel  the [1,2,1] x [1,2,1] / 16 blur applied before that conv, one per channel
  layer{2n}                4x4 block: minibatch-stddev channel, 3x3 conv (nf(4) + 1) -> nf(4)
  layer{2n+1}              dense nf(4)*4*4 -> nf(2)
  layer{2n+2}              dense nf(2) -> 1, linear (the score)

where block b works at resolution res_b = R / 2**b (b = 0 .. n, n = log2(R) - 2) and
nf(res) = min(fmaps_base // res, fmaps_max) with fmaps_base = 16384 and fmaps_max = 512.

Arithmetic (the facts, from the files above and the official TensorFlow StyleGAN they mirror):
* equalised learning rate: weights are stored unscaled and multiplied at run time by
  gain / sqrt(fan_in), gain sqrt(2) everywhere except the final dense layer (gain 1); biases are
  unscaled; activation leaky ReLU, slope 0.2 (none after the final dense layer).
* downsampling blocks blur their input first; at resolutions >= 128 the conv and the 2x downsample
  are fused (the 3x3 kernel is zero-padded to 5x5, the four 4x4 corner windows are averaged into one
  4x4 kernel, applied with stride 2 and padding 1); below 128 the 3x3 conv (padding 1) is followed by
  2x2 average pooling.
* minibatch standard deviation (group size 4, one new channel, epsilon 1e-8) before the 4x4 conv.
  LGrad ran one image at a time, where the group is that one image: its deviation from the group
  mean is 0 and the new channel is the constant sqrt(1e-8) = 1e-4. This module always computes that
  group-size-1 value, so every sample of a batch gets exactly what it would get alone and one
  backward pass gives every sample its own gradient (no coupling between samples).
* the dense layer flattens the (C, 4, 4) features in C, H, W order.
* progressive growing: with a fractional ``lod`` the FromRGB of the next coarser block is blended in,
  as genforce does; converted, fully trained models have lod = 0 and use input0 only (the other
  input{b} layers are stored but unused).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

RESOLUTIONS = (8, 16, 32, 64, 128, 256, 512, 1024)
FUSED_MIN_RES = 128
MBSTD_EPS = 1e-8
LRELU_SLOPE = 0.2


class _Blur(nn.Module):
    """Depthwise [1,2,1] x [1,2,1] / 16 blur, padding 1; the kernel is a (persistent) buffer."""

    def __init__(self, channels: int):
        super().__init__()
        k1 = torch.tensor([1.0, 2.0, 1.0])
        k2 = torch.outer(k1, k1)
        self.register_buffer("kernel", (k2 / k2.sum()).expand(channels, 1, 3, 3).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.kernel, padding=1, groups=x.shape[1])


class _Conv(nn.Module):
    """Equalised-lr conv + leaky ReLU; ``down`` in {None, 'fused', 'pool'}; ``mbstd`` adds the
    minibatch-stddev channel (group size 1) to the input first."""

    def __init__(self, cin: int, cout: int, k: int = 3, down: str | None = None, mbstd: bool = False):
        super().__init__()
        self.mbstd = mbstd
        if mbstd:
            cin += 1
        self.weight = nn.Parameter(torch.randn(cout, cin, k, k))
        self.bias = nn.Parameter(torch.zeros(cout))
        self.scale = math.sqrt(2.0) / math.sqrt(cin * k * k)
        self.down = down
        self.pad = k // 2
        if down is not None:
            self.blur = _Blur(cin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mbstd:
            # group of one: (x - mean)^2 == 0, so the channel is sqrt(0 + eps) for every sample
            std = torch.sqrt(x.new_zeros(()) + MBSTD_EPS)
            x = torch.cat([x, std.expand(x.shape[0], 1, x.shape[2], x.shape[3])], dim=1)
        w = self.weight * self.scale
        if self.down is not None:
            x = self.blur(x)
        if self.down == "fused":
            w = F.pad(w, (1, 1, 1, 1))
            w = 0.25 * (w[:, :, :-1, :-1] + w[:, :, 1:, :-1] + w[:, :, :-1, 1:] + w[:, :, 1:, 1:])
            x = F.conv2d(x, w, self.bias, stride=2, padding=1)
        else:
            x = F.conv2d(x, w, self.bias, padding=self.pad)
            if self.down == "pool":
                x = F.avg_pool2d(x, 2)
        return F.leaky_relu(x, LRELU_SLOPE)


class _Dense(nn.Module):
    def __init__(self, cin: int, cout: int, gain: float = math.sqrt(2.0), act: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin))
        self.bias = nn.Parameter(torch.zeros(cout))
        self.scale = gain / math.sqrt(cin)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.linear(x.flatten(1), self.weight * self.scale, self.bias)
        return F.leaky_relu(x, LRELU_SLOPE) if self.act else x


class StyleGAN1Discriminator(nn.Module):
    """StyleGAN v1 discriminator: (N, C, R, R) images in [-1, 1] -> (N, 1) scores.

    Defaults are those of LGrad's LSUN-bedroom model (R = 256, RGB, fmaps 16384 / 512)."""

    def __init__(self, resolution: int = 256, image_channels: int = 3,
                 fmaps_base: int = 16 << 10, fmaps_max: int = 512):
        super().__init__()
        if resolution not in RESOLUTIONS:
            raise ValueError(f"StyleGAN v1 discriminator resolution must be one of {RESOLUTIONS}, not {resolution}")
        self.resolution = resolution
        self.image_channels = image_channels
        self.n_blocks = int(math.log2(resolution)) - 1  # blocks b = 0 .. n_blocks - 1, the last at 4x4
        nf = lambda res: min(fmaps_base // res, fmaps_max)  # noqa: E731
        self.register_buffer("lod", torch.zeros(()))
        for b in range(self.n_blocks):
            res = resolution >> b
            self.add_module(f"input{b}", _Conv(image_channels, nf(res), k=1))
            if res > 4:
                down = "fused" if res >= FUSED_MIN_RES else "pool"
                self.add_module(f"layer{2 * b}", _Conv(nf(res), nf(res)))
                self.add_module(f"layer{2 * b + 1}", _Conv(nf(res), nf(res // 2), down=down))
            else:
                self.add_module(f"layer{2 * b}", _Conv(nf(res), nf(res), mbstd=True))
                self.add_module(f"layer{2 * b + 1}", _Dense(nf(res) * res * res, nf(res // 2)))
                self.add_module(f"layer{2 * b + 2}", _Dense(nf(res // 2), 1, gain=1.0, act=False))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        want = (self.image_channels, self.resolution, self.resolution)
        if image.ndim != 4 or tuple(image.shape[1:]) != want:
            raise ValueError(f"StyleGAN v1 discriminator expects (N, {want[0]}, {want[1]}, {want[2]}) images, "
                             f"got {tuple(image.shape)}")
        lod = float(self.lod)
        x = None
        for b in range(self.n_blocks):
            if b <= lod < b + 1:
                x = getattr(self, f"input{b}")(image)
            elif b - 1 < lod < b:  # fading in during progressive growing
                alpha = lod - math.floor(lod)
                x = getattr(self, f"input{b}")(image) * alpha + x * (1.0 - alpha)
            if lod < b + 1:
                x = getattr(self, f"layer{2 * b}")(x)
                x = getattr(self, f"layer{2 * b + 1}")(x)
            if lod > b:
                image = F.avg_pool2d(image, 2)
        return getattr(self, f"layer{2 * self.n_blocks}")(x)


def describe_state(sd: dict) -> str:
    """A hint about which architecture a state dict fits (for error messages)."""
    try:
        n = sum(1 for k in sd if k.startswith("input") and k.endswith(".weight"))
        w = sd["input0.weight"]
        return (f"the file holds {n} FromRGB layers (resolution {4 << (n - 1)}), "
                f"{w.shape[1]} image channels, {w.shape[0]} feature maps at full resolution")
    except Exception:
        return "the file does not look like a StyleGAN v1 discriminator (no input0.weight)"


class StyleGAN1Input(nn.Module):
    """Our pixels -> the discriminator's input, differentiably, so the gradient lands on our pixels.

    Our images are [0, 1] with 1 or 3 channels at the detector's size. They are resized to the
    discriminator's resolution when it differs (bilinear, antialiased, the analogue of LGrad's PIL
    bilinear ``Resize((256, 256))``; done inside the graph, so the representation has the detector's
    size, not the discriminator's), grey channels are repeated to RGB (an RGB image given to a
    one-channel discriminator is averaged), and [0, 1] is mapped to [-1, 1] (LGrad's
    ``Normalize(0.5, 0.5)``). Scaling the input only rescales the gradient, which the per-sample
    min-max removes."""

    def __init__(self, disc: StyleGAN1Discriminator, in_channels: int):
        super().__init__()
        dc = disc.image_channels
        if not (in_channels == dc or (in_channels, dc) in ((1, 3), (3, 1))):
            from guardian_plugin.errors import ConfigError

            raise ConfigError(f"transform 'stylegan1-discriminator': cannot feed {in_channels}-channel images "
                              f"to a {dc}-channel discriminator")
        self.disc = disc
        self.in_channels = in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.disc.resolution
        if tuple(x.shape[-2:]) != (r, r):
            x = F.interpolate(x, size=(r, r), mode="bilinear", align_corners=False, antialias=True)
        dc = self.disc.image_channels
        if x.shape[1] == 1 and dc == 3:
            x = x.expand(-1, 3, -1, -1)
        elif x.shape[1] == 3 and dc == 1:
            x = x.mean(1, keepdim=True)
        return self.disc(x * 2.0 - 1.0)


def load_stylegan1(path: str, spec: dict | None = None) -> StyleGAN1Discriminator:
    """Build the discriminator from ``spec`` (resolution 256, image_channels 3, fmaps_base 16384,
    fmaps_max 512 by default: LGrad's model) and load ``path`` strictly.

    ``path`` holds the discriminator's state dict (LGrad's ``*_discriminator.pth``), or a genforce
    converter checkpoint ``{'generator': ..., 'discriminator': ..., ...}`` whose 'discriminator' is
    used. Missing, corrupt or mismatched files raise ArtifactError naming the file."""
    from guardian_plugin.errors import ArtifactError, ConfigError
    from guardian_plugin.weights import load_state

    spec = dict(spec or {})
    what = "transform 'stylegan1-discriminator'"
    try:
        resolution = int(spec.get("resolution", 256))
        channels = int(spec.get("image_channels", 3))
        fmaps_base = int(spec.get("fmaps_base", 16 << 10))
        fmaps_max = int(spec.get("fmaps_max", 512))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{what}: resolution, image_channels, fmaps_base and fmaps_max must be integers ({e})") from None
    if resolution not in RESOLUTIONS:
        raise ConfigError(f"{what}: `resolution` must be one of {list(RESOLUTIONS)}, not {resolution}")
    if channels not in (1, 3):
        raise ConfigError(f"{what}: `image_channels` must be 1 or 3, not {channels}")
    disc = StyleGAN1Discriminator(resolution, channels, fmaps_base, fmaps_max)

    sd = load_state(path, what)
    if isinstance(sd, dict) and isinstance(sd.get("discriminator"), dict):
        sd = sd["discriminator"]
    if not isinstance(sd, dict):
        raise ArtifactError(f"{what}: weights file {path} holds a {type(sd).__name__}, not a state dict")
    try:
        disc.load_state_dict(sd, strict=True)
    except Exception as e:  # missing/unexpected keys, shape mismatches, non-tensor values
        raise ArtifactError(
            f"{what}: weights file {path} does not fit a resolution-{resolution}, {channels}-channel StyleGAN v1 "
            f"discriminator (fmaps_base {fmaps_base}, fmaps_max {fmaps_max}); {describe_state(sd)} ({e})") from e
    lod = float(disc.lod)
    if not (0.0 <= lod <= disc.n_blocks - 1) or lod != lod:
        raise ArtifactError(f"{what}: weights file {path} has lod {lod}, outside 0..{disc.n_blocks - 1}")
    return disc
