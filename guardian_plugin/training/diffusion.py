"""A small DDPM trained on the defender's real images with diffusers, sampled with DDIM: the
`diffusion` synthetic source."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm import tqdm

from guardian_plugin.training.common import seed_everything


def _pad_size(size: int) -> int:
    return max(8, 1 << (size - 1).bit_length())  # UNet needs a power of two: 28 -> 32


def build_unet(channels: int, size: int, width: int = 32):
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=_pad_size(size), in_channels=channels, out_channels=channels, layers_per_block=1,
        block_out_channels=(width, width * 2, width * 2),
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )


def train_ddpm(x01: torch.Tensor, *, steps: int = 3000, batch_size: int = 64, width: int = 32, lr: float = 1e-3,
               seed: int = 0, device="cpu", progress: bool = True):
    """Epsilon-prediction DDPM (1,000 training timesteps, linear betas). ``x01`` in [0, 1].
    Returns (unet, history)."""
    from diffusers import DDPMScheduler

    seed_everything(seed)
    c, size = x01.shape[1], x01.shape[-1]
    p = (_pad_size(size) - size) // 2
    data = F.pad(x01 * 2 - 1, (p, _pad_size(size) - size - p) * 2, value=-1.0)
    unet = build_unet(c, size, width).to(device)
    sched = DDPMScheduler(num_train_timesteps=1000)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr)
    lr_sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=max(0.05, 2.0 / steps))
    history = []
    unet.train()
    run = 0.0
    for step in tqdm(range(steps), desc="diffusion", disable=not progress):
        idx = torch.randint(0, len(data), (batch_size,))
        x0 = data[idx].to(device)
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (batch_size,), device=device)
        loss = F.mse_loss(unet(sched.add_noise(x0, noise, t), t).sample, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        lr_sched.step()
        run = 0.98 * run + 0.02 * loss.item() if step else loss.item()
        if (step + 1) % 250 == 0:
            history.append({"step": step + 1, "loss": run})
    return unet.eval(), history


@torch.no_grad()
def sample_ddim(unet, n: int, size: int, channels: int, steps: int = 50, seed: int = 0, device="cpu",
                batch: int = 250, progress: bool = True) -> torch.Tensor:
    """``n`` images in [0, 1] of ``size`` px (cropped back from the padded size)."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(num_train_timesteps=1000)
    sched.set_timesteps(steps)
    full = _pad_size(size)
    p = (full - size) // 2
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for k in tqdm(range(0, n, batch), desc="diffusion sampling", disable=not progress):
        x = torch.randn(min(batch, n - k), channels, full, full, generator=gen).to(device)
        for t in sched.timesteps:
            x = sched.step(unet(x, t).sample, t, x).prev_sample
        out.append(((x[..., p:p + size, p:p + size] + 1) / 2).clamp(0, 1).cpu())
    return torch.cat(out)
