"""Pieces several attacks share: pixel <-> victim-input conversion, proxy data that is NOT the victim's
(scikit-image photographs, DFMS's synthetic shapes), a DCGAN pretrained on proxy data without any
victim query (cached on disk), a class-balance term, and a second, independently initialised clone.

Nothing here queries the victim, and nothing here registers an attack.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
from typing import Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


# ------------------------------------------------------------------------------ input format
def norm_consts(mean: Sequence[float], std: Sequence[float], device) -> Tuple[torch.Tensor, torch.Tensor]:
    """The victim's normalisation (attack params ``mean``/``std``; the harness passes the victim's) as
    (1, C, 1, 1) tensors."""
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return mean_t, std_t


def to_input(pix: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """[0, 1] pixels -> the victim's (normalised) input."""
    return (pix - mean) / std


def to_pixels(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (x * std + mean).clamp(0.0, 1.0)


GENERATOR_OUTPUTS = ("normalised", "pixels")


def tanh_to_input(t: torch.Tensor, output: str, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """A tanh generator's output in [-1, 1] -> the victim's input.

    ``normalised``: used as an already-normalised input (the published DFME / MAZE / DisGUIDE / Dual
    Students code, written for CIFAR normalisation, where [-1, 1] covers most of the input range).
    ``pixels``: mapped to [0, 1] pixels, then normalised with the victim's constants; this reaches the
    victim's whole input range whatever its normalisation (MNIST's 0.1307 / 0.3081 puts white at 2.82,
    out of reach of ``normalised``)."""
    if output == "normalised":
        return t
    if output == "pixels":
        return ((t + 1) * 0.5 - mean) / std
    raise ValueError(f"generator output {output!r}: use one of {GENERATOR_OUTPUTS}")


def check_output(output: str) -> str:
    """``output`` if it is one of :data:`GENERATOR_OUTPUTS`, else ValueError."""
    if output not in GENERATOR_OUTPUTS:
        raise ValueError(f"generator output {output!r}: use one of {GENERATOR_OUTPUTS}")
    return output


# -------------------------------------------------------------------------------- proxy data
def photo_proxy(n: int, size: int, channels: int, seed: int = 0, group: str = "evaluate") -> torch.Tensor:
    """``n`` crops of scikit-image / scikit-learn photographs as [0, 1] tensors (n, C, size, size).

    Uses the packaged photo groups of :mod:`guardian_plugin.training.data`; the default group
    ("evaluate") is the one the detector never trains or calibrates on, so the attacker's proxy data
    is independent of the defender's."""
    return _photo_crops(n, size, channels, seed, group).clone()


@functools.lru_cache(maxsize=8)
def _photo_crops(n: int, size: int, channels: int, seed: int, group: str) -> torch.Tensor:
    from guardian_plugin.training.data import photo_crops, to_float  # loading the photos takes seconds

    return to_float(photo_crops(group, n, size=size, channels=channels, seed=seed))


def shapes_proxy(n: int, size: int, channels: int, seed: int = 0, canvas: int = 64) -> torch.Tensor:
    """DFMS's "synthetic shapes" proxy: random rectangles, ellipses, triangles and lines of random
    grey levels (or colours) on a random background, blurred and resized. [0, 1], (n, C, size, size)."""
    from skimage.draw import ellipse, line_aa, polygon, rectangle
    from skimage.filters import gaussian
    from skimage.transform import resize

    rng = np.random.RandomState(seed)
    out = np.empty((n, channels, size, size), np.float32)
    for i in range(n):
        img = np.ones((canvas, canvas, channels)) * rng.uniform(0, 1, channels)
        for _ in range(rng.randint(1, 6)):
            colour = rng.uniform(0, 1, channels)
            kind = rng.randint(4)
            if kind == 0:
                a, b = rng.randint(0, canvas, 2), rng.randint(4, canvas // 2, 2)
                rr, cc = rectangle(tuple(a), extent=tuple(b), shape=(canvas, canvas))
            elif kind == 1:
                rr, cc = ellipse(rng.randint(canvas), rng.randint(canvas), rng.randint(3, canvas // 3),
                                 rng.randint(3, canvas // 3), shape=(canvas, canvas), rotation=rng.uniform(0, np.pi))
            elif kind == 2:
                rr, cc = polygon(rng.randint(0, canvas, 3), rng.randint(0, canvas, 3), shape=(canvas, canvas))
            else:
                r0, c0, r1, c1 = rng.randint(0, canvas, 4)
                rr, cc, _ = line_aa(r0, c0, r1, c1)
                keep = (rr < canvas) & (cc < canvas)
                rr, cc = rr[keep], cc[keep]
            img[rr, cc] = colour
        img = gaussian(img, sigma=rng.uniform(0.5, 2.0), channel_axis=-1)
        img = resize(img, (size, size), anti_aliasing=True)
        out[i] = np.clip(img, 0, 1).transpose(2, 0, 1)
    return torch.from_numpy(out)


def proxy_images(kind: str, n: int, size: int, channels: int, seed: int = 0) -> torch.Tensor:
    """``photos`` (or ``photos:<group>``) or ``shapes``."""
    if kind == "shapes":
        return shapes_proxy(n, size, channels, seed)
    if kind.startswith("photos"):
        group = kind.split(":", 1)[1] if ":" in kind else "evaluate"
        return photo_proxy(n, size, channels, seed, group)
    raise ValueError(f"unknown proxy data {kind!r}: use 'photos', 'photos:<group>' or 'shapes'")


# ------------------------------------------------------------------------- proxy-pretrained GAN
def pretrain_proxy_gan(proxy: str, size: int, channels: int, *, nz: int = 100, width: int = 32,
                       steps: int = 1000, batch: int = 64, n_images: int = 4000, seed: int = 0,
                       cache_dir: str | None = None, device="cpu", progress: bool = False):
    """A DCGAN (generator and discriminator of :mod:`guardian_plugin.nets`) trained on proxy images
    only (no victim query), non-saturating loss, Adam 2e-4 (beta1 0.5). Returns (G, D, proxy images).

    With ``cache_dir`` the trained weights are saved under a key of every setting and reused, so the
    attacks that need a proxy GAN (DFMS, QUDA) and repeated seeds pay for it once.

    A cache hit and a miss leave the caller's random stream in the same state: both build the two
    networks from it, and training runs in a forked stream seeded with ``seed``. (Before, training
    reseeded the caller's stream, so the run that happened to train the GAN continued from the GAN's
    seed and its figures depended on the cache.) The initial weights come from the caller's stream, so
    the cached GAN is the one the first attack to need it would train: for the evaluation harness,
    whose runs reseed before building an attack, the first seed's DFMS or QUDA run."""
    from tqdm import tqdm

    from guardian_plugin.nets import DCGANDiscriminator, DCGANGenerator
    from guardian_plugin.training.gan import gan_step

    real = proxy_images(proxy, n_images, size, channels, seed)
    g = DCGANGenerator(nz, channels, size, width).to(device)
    d = DCGANDiscriminator(channels, width).to(device)
    key = dict(proxy=proxy, size=size, channels=channels, nz=nz, width=width, steps=steps, batch=batch,
               n_images=n_images, seed=seed)
    path = None
    if cache_dir:
        digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
        path = os.path.join(cache_dir, f"proxy_gan_{digest}.pt")
        if os.path.exists(path):
            sd = torch.load(path, map_location="cpu", weights_only=True)
            g.load_state_dict(sd["g"])
            d.load_state_dict(sd["d"])
            return g, d, real
    cuda = [torch.device(device).index or 0] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        opt_g = torch.optim.Adam(g.parameters(), lr=2e-4, betas=(0.5, 0.999))
        opt_d = torch.optim.Adam(d.parameters(), lr=2e-4, betas=(0.5, 0.999))
        for _ in tqdm(range(steps), desc=f"proxy GAN ({proxy})", disable=not progress, leave=False):
            xr = real[torch.randint(len(real), (batch,), generator=gen)].to(device)
            gan_step(g, d, opt_g, opt_d, xr, torch.randn(batch, nz, device=device))
    if path:
        os.makedirs(cache_dir, exist_ok=True)
        torch.save({"g": g.state_dict(), "d": d.state_dict(), "key": key}, path)
    return g, d, real


# ------------------------------------------------------------------------------------- losses
def balance_loss(probs: torch.Tensor) -> torch.Tensor:
    """sum_k pbar_k log pbar_k of the batch-mean prediction: minimising it spreads the batch over the
    classes (maximises the entropy of the mean prediction)."""
    pbar = probs.mean(0)
    return (pbar * pbar.clamp_min(1e-8).log()).sum()


def kl_to_answers(logits: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """KL(victim || clone), batch mean."""
    return F.kl_div(F.log_softmax(logits, 1), probs.clamp_min(1e-8), reduction="batchmean")


# --------------------------------------------------------------------------------- clones
def fresh_copy(model: nn.Module, seed: int) -> nn.Module:
    """Same architecture as ``model``, parameters re-initialised from ``seed`` (a second student)."""
    other = copy.deepcopy(model)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    for m in other.modules():
        if hasattr(m, "reset_parameters") and m is not other:
            m.reset_parameters()
    torch.random.set_rng_state(state)
    return other


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr


def cosine(lr0: float, done: int, total: int) -> float:
    import math

    return 0.5 * lr0 * (1 + math.cos(math.pi * min(done / max(total, 1), 1.0)))


def augment_shift(x: torch.Tensor, pad: int = 2) -> torch.Tensor:
    """Random translation by up to ``pad`` pixels (reflect-padded), per sample."""
    if pad <= 0:
        return x
    b, _, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    dy = torch.randint(0, 2 * pad + 1, (b,))
    dx = torch.randint(0, 2 * pad + 1, (b,))
    return torch.stack([xp[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])


def sequence(v) -> Sequence[float]:
    return list(v) if isinstance(v, (list, tuple)) else [float(v)]
