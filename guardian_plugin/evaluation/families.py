"""Generator families that no detector training source contains: the held-out families on which the
CIFAR-10 detector's generalisation is measured (issue #11, step 5). One registry entry each, keyed
by the name used in YAML and on the command line.

The detector trains on ``dfme`` (GeneratorA: nearest upsampling + conv, BatchNorm, tanh), ``gan``
(the DCGAN of training/gan.py: ConvTranspose2d kernel 4 stride 2, sigmoid) and ``diffusion`` (a
small DDPM sampled with 50 DDIM steps). Keep every family below OUT of every training and tuning
step: they exist to be evaluated on.

- ``vae``              a small convolutional VAE fitted to the real images; samples decode z ~ N(0, I)
- ``gan_transposed``   a GAN (the ``gan`` source's loss, step and discriminator) whose generator
                       upsamples with ConvTranspose2d kernel 3 stride 2 (uneven overlap, the classic
                       checkerboard), tanh-shaped output. The ``gan`` source also upsamples with
                       transposed convolutions (kernel 4, even overlap): this family is unseen by
                       kernel, output layer and training run, not by the upsampling operator
- ``gan_bilinear``     the same GAN with bilinear upsampling + conv: an operator in no source
- ``random_bn_train``  randomly initialised GeneratorA (the DFME generator before its first step),
                       BatchNorm in train mode (batch statistics), as an attacker's first queries.
                       The ``dfme`` source also samples its generators' initial states in train mode:
                       this family is unseen by initialisation seed only
- ``random_bn_eval``   the same in eval mode (fresh running statistics): low-contrast grey images.
                       Unseen only where the ``dfme`` source's ``eval_share`` is 0 (the CIFAR-10 config)
- ``ddim_few_steps``   the ``diffusion`` source's architecture, trained independently (another seed)
                       and sampled with few DDIM steps (5 and 10): unseen by sampler, NOT by
                       architecture or training objective
- ``laundered``        ``laundered:<family>``: another family's output through a Gaussian blur
                       (sigma ~ U[0.5, 1.5]), a JPEG round trip (quality ~ U[60, 95]) or both

Fitted families learn from ``ctx.real01``, which must be the detector-TRAIN real split (the
defender's data the sources learned from); never the calibration or evaluation split. Their fitted
weights are cached under ``ctx.cache_dir`` (``.cache/families/<family>-<key>.pt``), the key covering
family, parameters, seed and a digest of the real images.

``jpeg75`` (default on, for the CIFAR-10 JPEG copy): every family's output goes through the same
quality-75 JPEG round trip as the real images, so JPEG blocking says nothing about realness
(../shared/data/README.md).

Default budgets are the CPU-sized defaults of the matching training sources (training/sources.py).
Against a detector, give a family the budget of the source it is compared with (CIFAR-10,
examples/cifar10/detector-config.yaml: GAN 30 epochs at width 64, DDPM 20,000 steps at width 32), so
that an unseen family is no easier to catch for being less trained.

:func:`hf_energy_rule` is the trivial one-statistic baseline to report next to the detector.
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from guardian_plugin.registry import Registry
from guardian_plugin.training.augment import AugmentConfig, augment, jpeg_roundtrip
from guardian_plugin.training.common import seed_everything
from guardian_plugin.training.data import denormalise, to_uint8
from guardian_plugin.training.sources import SourceContext

FAMILIES: Registry = Registry("generator family")


class FamilyContext(SourceContext):
    """A source context without a victim (no family queries one) plus the cache folder (None: no
    cache). ``real01``: the detector-TRAIN real images in [0, 1]; ``mean``/``std``: the victim's
    normalisation, which the GeneratorA families need."""

    def __init__(self, real01: torch.Tensor, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 seed: int = 0, device="cpu", cache_dir: str | None = ".cache/families", progress: bool = False):
        super().__init__(real01, None, mean, std, device=device, seed=seed, progress=progress)
        self.cache_dir = cache_dir
        self._digest: str | None = None

    def data_digest(self) -> str:
        if self._digest is None:
            self._digest = hashlib.sha256(to_uint8(self.real01).tobytes()).hexdigest()[:12]
        return self._digest


def generate(name: str, ctx: FamilyContext, n: int, jpeg75: bool = True, **params) -> np.ndarray:
    """``n`` uint8 images (n, C, H, W) of family ``name`` (``laundered:<family>`` for a laundered one)."""
    t = time.time()
    kind, _, inner = name.partition(":")
    if inner:
        params["family"] = inner
    elif kind == "laundered":
        raise ValueError("family 'laundered' wraps another: name it 'laundered:<family>'")
    ctx.info = {"family": name, "cached": []}
    x = FAMILIES.get(kind)(ctx, n, **params).cpu().clamp(0, 1)
    if jpeg75:
        x = torch.stack([jpeg_roundtrip(img, 75) for img in x])
    ctx.info["seconds"] = round(time.time() - t, 1)
    return to_uint8(x)


def _fitted(ctx: FamilyContext, family: str, params: dict, build: Callable[[], nn.Module],
            fit: Callable[[], nn.Module]) -> nn.Module:
    """``fit()`` (a model fitted to ctx.real01), or the cached weights loaded into ``build()``."""
    from guardian_plugin.training.pipeline import _hash

    path = None
    if ctx.cache_dir:
        key = _hash({"family": family, "params": params, "seed": ctx.seed, "data": ctx.data_digest(),
                     "shape": list(ctx.real01.shape)})
        path = os.path.join(ctx.cache_dir, f"{family}-{key}.pt")
        if os.path.exists(path):
            model = build()
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            ctx.info["cached"].append(family)
            return model.to(ctx.device).eval()
    model = fit().eval()
    if path:
        os.makedirs(ctx.cache_dir, exist_ok=True)
        torch.save({k: v.cpu() for k, v in model.state_dict().items()}, path)
    return model


# -------------------------------------------------------------------------------- networks
class UpsamplingGenerator(nn.Module):
    """z -> fc (4*width x s0 x s0) -> 2-3 x [upsample x2, BatchNorm, ReLU] -> 3x3 conv -> sigmoid, with
    ``mode`` ``transposed`` (ConvTranspose2d kernel 3, stride 2) or ``bilinear`` (bilinear upsampling,
    then a 3x3 conv). ``size`` divisible by 4 (three steps when divisible by 8)."""

    def __init__(self, nz: int = 64, channels: int = 3, size: int = 32, width: int = 64, mode: str = "transposed"):
        super().__init__()
        if size % 4 or mode not in ("transposed", "bilinear"):
            raise ValueError(f"UpsamplingGenerator: size {size} must be divisible by 4, mode {mode!r} "
                             "'transposed' or 'bilinear'")
        ups = 3 if size % 8 == 0 else 2
        self.nz, self.s0, self.c0 = nz, size >> ups, width * 4
        self.fc = nn.Sequential(nn.Linear(nz, self.c0 * self.s0 ** 2), nn.BatchNorm1d(self.c0 * self.s0 ** 2), nn.ReLU())
        layers, cin = [], self.c0
        for i in range(ups):
            cout = max(width, cin // 2)
            if mode == "transposed":
                layers.append(nn.ConvTranspose2d(cin, cout, 3, 2, 1, output_padding=1, bias=False))
            else:
                layers += [nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                           nn.Conv2d(cin, cout, 3, 1, 1, bias=False)]
            layers += [nn.BatchNorm2d(cout), nn.ReLU()]
            cin = cout
        self.net = nn.Sequential(*layers, nn.Conv2d(cin, channels, 3, 1, 1), nn.Sigmoid())

    def forward(self, z):
        return self.net(self.fc(z).view(len(z), self.c0, self.s0, self.s0))


class ConvVAE(nn.Module):
    """Three stride-2 convs to (mu, log-variance) of ``nz`` latents; the decoder is an
    :class:`UpsamplingGenerator` (transposed convolutions). Pixels in [0, 1]."""

    def __init__(self, nz: int = 64, channels: int = 3, size: int = 32, width: int = 32):
        super().__init__()
        self.nz = nz
        self.enc = nn.Sequential(
            nn.Conv2d(channels, width, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(width, width * 2, 4, 2, 1), nn.BatchNorm2d(width * 2), nn.LeakyReLU(0.2),
            nn.Conv2d(width * 2, width * 4, 4, 2, 1), nn.BatchNorm2d(width * 4), nn.LeakyReLU(0.2), nn.Flatten())
        with torch.no_grad():
            flat = self.enc(torch.zeros(2, channels, size, size)).shape[1]
        self.head = nn.Linear(flat, 2 * nz)
        self.dec = UpsamplingGenerator(nz, channels, size, width, "transposed")

    def forward(self, x):
        mu, logvar = self.head(self.enc(x)).chunk(2, 1)
        return self.dec(mu + torch.randn_like(mu) * (0.5 * logvar).exp()), mu, logvar


def train_vae(x01: torch.Tensor, *, epochs: int = 20, batch_size: int = 64, nz: int = 64, width: int = 32,
              lr: float = 1e-3, seed: int = 0, device="cpu", progress: bool = False) -> ConvVAE:
    """Bernoulli likelihood (BCE summed over pixels) + KL to N(0, I), Adam."""
    from tqdm import tqdm

    seed_everything(seed)
    vae = ConvVAE(nz, x01.shape[1], x01.shape[-1], width).to(device)
    opt = torch.optim.Adam(vae.parameters(), lr=lr)
    vae.train()
    for _ in tqdm(range(epochs), desc="vae", disable=not progress):
        perm = torch.randperm(len(x01))
        for k in range(0, len(x01) - batch_size + 1, batch_size):
            x = x01[perm[k:k + batch_size]].to(device)
            rec, mu, logvar = vae(x)
            kl = -0.5 * (1 + logvar - mu ** 2 - logvar.exp()).sum(1)
            loss = (F.binary_cross_entropy(rec, x, reduction="none").flatten(1).sum(1) + kl).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return vae.eval()


# -------------------------------------------------------------------------------- families
@FAMILIES.register("vae")
def vae_family(ctx: FamilyContext, n: int, epochs: int = 20, nz: int = 64, width: int = 32, **params) -> torch.Tensor:
    """A convolutional VAE fitted to ctx.real01 (detector-train split only); its decoder on z ~ N(0, I)."""
    from guardian_plugin.training.gan import sample_generator

    settings = {"epochs": epochs, "nz": nz, "width": width, **params}
    vae = _fitted(ctx, "vae", settings, lambda: ConvVAE(nz, ctx.channels, ctx.size, width),
                  lambda: train_vae(ctx.real01, seed=ctx.seed, device=ctx.device, progress=ctx.progress, **settings))
    return sample_generator(vae.dec, n, seed=ctx.seed + 1, device=ctx.device)


def _gan_family(mode: str):
    def family(ctx: FamilyContext, n: int, epochs: int = 20, nz: int = 64, width: int = 32, **params) -> torch.Tensor:
        from functools import partial

        from guardian_plugin.training.gan import sample_generator, train_dcgan

        settings = {"epochs": epochs, "nz": nz, "width": width, **params}
        make = partial(UpsamplingGenerator, mode=mode)
        g = _fitted(ctx, f"gan_{mode}", settings, lambda: make(nz, ctx.channels, ctx.size, width),
                    lambda: train_dcgan(ctx.real01, seed=ctx.seed, device=ctx.device, progress=ctx.progress,
                                        desc=f"gan_{mode}", generator=make, **settings)[0])
        return sample_generator(g, n, seed=ctx.seed + 1, device=ctx.device)

    family.__doc__ = (f"A GAN fitted to ctx.real01 (detector-train split only) with training/gan.py's loss, step "
                      f"and discriminator; its generator upsamples {mode} (:class:`UpsamplingGenerator`).")
    return family


FAMILIES.register("gan_transposed")(_gan_family("transposed"))
FAMILIES.register("gan_bilinear")(_gan_family("bilinear"))


def _random_generator_a(train_mode: bool):
    @torch.no_grad()
    def family(ctx: FamilyContext, n: int, inits: int = 5, nz: int = 256, ngf: int = 64, batch_size: int = 256,
               output: str = "normalised") -> torch.Tensor:
        from guardian_plugin.attacks.common import tanh_to_input
        from guardian_plugin.nets import GeneratorA

        if ctx.mean is None or ctx.std is None:
            raise ValueError("the random GeneratorA families need the victim's mean and std (FamilyContext)")
        mean = torch.tensor(ctx.mean).view(1, -1, 1, 1)
        std = torch.tensor(ctx.std).view(1, -1, 1, 1)
        gen = torch.Generator().manual_seed(ctx.seed + 1)
        out = []
        for k in range(inits):
            m = n // inits + (k < n % inits)
            torch.manual_seed(10_000 * (ctx.seed + 1) + k)  # apart from the dfme source's 1000 + seed + k
            g = GeneratorA(nz, ctx.channels, ctx.size, ngf).train(train_mode)
            for i in range(0, m, batch_size):
                t = g(torch.randn(min(batch_size, m - i), nz, generator=gen))
                out.append(denormalise(tanh_to_input(t, output, mean, std), ctx.mean, ctx.std))
        return torch.cat(out)

    family.__doc__ = (f"``inits`` randomly initialised GeneratorA (the DFME generator), BatchNorm in "
                      f"{'train mode (batch statistics, batches of batch_size)' if train_mode else 'eval mode'}; "
                      "tanh output used as the victim's input the way the attack's client sends it "
                      "(``output`` as in attacks/common.tanh_to_input), mapped back to [0, 1] pixels with the "
                      "victim's mean and std. Fits nothing.")
    return family


FAMILIES.register("random_bn_train")(_random_generator_a(True))
FAMILIES.register("random_bn_eval")(_random_generator_a(False))


@FAMILIES.register("ddim_few_steps")
def ddim_few_steps_family(ctx: FamilyContext, n: int, steps: int = 1500, width: int = 16,
                          sample_steps: Sequence[int] = (5, 10), **params) -> torch.Tensor:
    """The ``diffusion`` source's DDPM (same UNet family, same objective), trained on ctx.real01
    (detector-train split only) with seed 1000 + seed so that it is another model than the source's
    (which trains with the config's seed), sampled with few DDIM steps (``n`` split evenly over
    ``sample_steps``). Unseen by sampler, not by architecture."""
    from guardian_plugin.training.diffusion import build_unet, sample_ddim, train_ddpm

    settings = {"steps": steps, "width": width, **params}
    unet = _fitted(ctx, "ddim_few_steps", settings, lambda: build_unet(ctx.channels, ctx.size, width),
                   lambda: train_ddpm(ctx.real01, seed=1000 + ctx.seed, device=ctx.device, progress=ctx.progress,
                                      **settings)[0])
    out = []
    for k, s in enumerate(sample_steps):
        m = n // len(sample_steps) + (k < n % len(sample_steps))
        out.append(sample_ddim(unet, m, ctx.size, ctx.channels, steps=int(s), seed=ctx.seed + 1 + k,
                               device=ctx.device, progress=ctx.progress))
    return torch.cat(out)


@FAMILIES.register("laundered")
def laundered_family(ctx: FamilyContext, n: int, family: str = "", blur_sigma: Sequence[float] = (0.5, 1.5),
                     jpeg_quality: Sequence[int] = (60, 95), **params) -> torch.Tensor:
    """``family``'s raw output (``params`` are its own) through :func:`launder`."""
    kind = family.partition(":")[0]
    if kind == "laundered" or kind not in FAMILIES:
        raise ValueError(f"laundered:<family> wraps one of {[f for f in FAMILIES if f != 'laundered']}, got {family!r}")
    return launder(FAMILIES.get(kind)(ctx, n, **params).cpu(), ctx.seed + 2, blur_sigma, jpeg_quality)


def launder(x01: torch.Tensor, seed: int, blur_sigma: Sequence[float] = (0.5, 1.5),
            jpeg_quality: Sequence[int] = (60, 95)) -> torch.Tensor:
    """Each [0, 1] image Gaussian-blurred (sigma ~ U[blur_sigma]), JPEG round-tripped (quality ~
    U[jpeg_quality]) or both, one third each: what an attacker does to hide a generator's traces. Also
    for laundering a training source's held-out images."""
    x = x01.clamp(0, 1).clone()
    gen = torch.Generator().manual_seed(seed)
    how = torch.randint(0, 3, (len(x),), generator=gen)  # 0 blur, 1 JPEG, 2 both
    off = dict(crop_pad=0, flip=0.0, blur=0.0, jpeg=0.0)
    for sel, cfg in ((how != 1, AugmentConfig(**{**off, "blur": 1.0, "blur_sigma": tuple(blur_sigma)})),
                     (how != 0, AugmentConfig(**{**off, "jpeg": 1.0, "jpeg_quality": tuple(jpeg_quality)}))):
        if sel.any():
            x[sel] = augment(x[sel], cfg, gen)
    return x


# -------------------------------------------------------------------------------- baseline
def hf_energy(x_u8: np.ndarray) -> np.ndarray:
    """Each image's high-frequency energy: the mean squared 3x3 Laplacian of its grey level in [0, 1]."""
    g = torch.from_numpy(np.ascontiguousarray(x_u8)).float().div(255).mean(1, keepdim=True)
    lap = torch.tensor([[0., 1., 0.], [1., -4., 1.], [0., 1., 0.]]).view(1, 1, 3, 3)
    return F.conv2d(g, lap).pow(2).mean((1, 2, 3)).numpy()


def hf_energy_rule(real_calib_u8: np.ndarray, lo: float = 2.5, hi: float = 97.5) -> Callable[[np.ndarray], np.ndarray]:
    """The one-statistic baseline: flag an image whose :func:`hf_energy` lies outside the [lo, hi]
    percentiles of the real calibration images (about (100 - hi + lo)% FPR on real images like them)."""
    a, b = np.percentile(hf_energy(real_calib_u8), [lo, hi])

    def flagged(x_u8: np.ndarray) -> np.ndarray:
        e = hf_energy(x_u8)
        return (e < a) | (e > b)

    flagged.bounds = (float(a), float(b))
    return flagged
