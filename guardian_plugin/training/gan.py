"""A DCGAN trained on the defender's real images: the `gan` synthetic source, and the GAN whose
discriminator is the `discriminator` transformation model."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from guardian_plugin.nets import DCGANDiscriminator, DCGANGenerator
from guardian_plugin.training.common import seed_everything


def gan_step(g, d, opt_g, opt_d, real: torch.Tensor, z: torch.Tensor):
    """One non-saturating GAN step: the discriminator on ``real`` and g(z), then the generator.
    Returns (loss_d, loss_g)."""
    fake = g(z)
    loss_d = F.softplus(-d(real)).mean() + F.softplus(d(fake.detach())).mean()
    opt_d.zero_grad()
    loss_d.backward()
    opt_d.step()
    loss_g = F.softplus(-d(fake)).mean()
    opt_g.zero_grad()
    loss_g.backward()
    opt_g.step()
    return loss_d, loss_g


def train_dcgan(x01: torch.Tensor, *, epochs: int = 20, batch_size: int = 64, nz: int = 64, width: int = 64,
                lr: float = 2e-4, seed: int = 0, device="cpu", progress: bool = True, desc: str = "gan",
                generator: Callable[..., nn.Module] = DCGANGenerator):
    """Non-saturating GAN loss, Adam(2e-4, betas 0.5/0.999). ``x01``: (N, C, H, W) in [0, 1].
    ``generator(nz, channels, size, width)`` builds the generator (output in [0, 1], an ``nz``
    attribute); the discriminator is always :class:`DCGANDiscriminator`.
    Returns (generator, discriminator, history)."""
    seed_everything(seed)
    c, size = x01.shape[1], x01.shape[-1]
    g = generator(nz, c, size, width).to(device)
    d = DCGANDiscriminator(c, width).to(device)
    opt_g = torch.optim.Adam(g.parameters(), lr=lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(d.parameters(), lr=lr, betas=(0.5, 0.999))
    history = []
    for ep in tqdm(range(epochs), desc=desc, disable=not progress):
        perm = torch.randperm(len(x01))
        ld = lg = 0.0
        n = 0
        for k in range(0, len(x01) - batch_size + 1, batch_size):
            real = x01[perm[k:k + batch_size]].to(device)
            loss_d, loss_g = gan_step(g, d, opt_g, opt_d, real, torch.randn(batch_size, nz, device=device))
            ld, lg, n = ld + loss_d.item(), lg + loss_g.item(), n + 1
        history.append({"epoch": ep + 1, "loss_d": ld / max(n, 1), "loss_g": lg / max(n, 1)})
    return g.eval(), d.eval(), history


@torch.no_grad()
def sample_generator(g: nn.Module, n: int, seed: int = 0, device="cpu") -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    g.eval()
    for k in range(0, n, 500):
        z = torch.randn(min(500, n - k), g.nz, generator=gen).to(device)
        out.append(g(z).cpu())
    return torch.cat(out)
