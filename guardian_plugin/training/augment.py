"""The detector's training augmentation (paper A-C; CNNDetection): random crop, horizontal flip,
Gaussian blur and JPEG re-compression, applied to [0, 1] pixel images BEFORE the transformation
model, so the detector learns what survives post-processing of a query."""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field


class AugmentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    crop_pad: int = Field(2, ge=0)          # reflect-pad then crop back: random translation
    flip: float = Field(0.5, ge=0, le=1)    # probability of a horizontal flip
    blur: float = Field(0.1, ge=0, le=1)    # probability of a Gaussian blur
    blur_sigma: Tuple[float, float] = (0.1, 1.0)
    jpeg: float = Field(0.1, ge=0, le=1)    # probability of JPEG re-compression
    jpeg_quality: Tuple[int, int] = (30, 100)


def augment(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator | None = None) -> torch.Tensor:
    b, c, h, w = x.shape
    if cfg.crop_pad:
        p = cfg.crop_pad
        x = random_crops(F.pad(x, (p, p, p, p), mode="reflect"), h, w, gen)
    if cfg.flip:
        m = torch.rand(b, generator=gen) < cfg.flip
        x = torch.where(m.view(-1, 1, 1, 1), x.flip(-1), x)
    if cfg.blur:
        from torchvision.transforms.functional import gaussian_blur

        x = x.clone()
        for k in torch.nonzero(torch.rand(b, generator=gen) < cfg.blur).flatten().tolist():
            lo, hi = cfg.blur_sigma
            s = float(lo + (hi - lo) * torch.rand(1, generator=gen))
            ks = max(3, 2 * int(3 * s) + 1)
            x[k] = gaussian_blur(x[k:k + 1], [ks, ks], [s, s])[0]
    if cfg.jpeg:
        x = x.clone()
        for k in torch.nonzero(torch.rand(b, generator=gen) < cfg.jpeg).flatten().tolist():
            lo, hi = cfg.jpeg_quality
            x[k] = jpeg_roundtrip(x[k], int(torch.randint(lo, hi + 1, (1,), generator=gen)))
    return x


def random_crops(x: torch.Tensor, h: int, w: int, gen: torch.Generator | None = None) -> torch.Tensor:
    """One uniformly placed ``h`` x ``w`` crop of each image of (B, C, H, W) ``x`` (rows, then columns drawn)."""
    b, _, hh, ww = x.shape
    i = torch.randint(0, hh - h + 1, (b,), generator=gen)
    j = torch.randint(0, ww - w + 1, (b,), generator=gen)
    return torch.stack([x[k, :, i[k]:i[k] + h, j[k]:j[k] + w] for k in range(b)])


def jpeg_roundtrip(img: torch.Tensor, quality: int) -> torch.Tensor:
    """One (C, H, W) [0, 1] image through JPEG at ``quality`` (PIL), back to [0, 1]."""
    import io

    import numpy as np
    from PIL import Image

    a = (img * 255).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
    pil = Image.fromarray(a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0))
    buf = io.BytesIO()
    pil.save(buf, format="JPEG", quality=quality)
    out = np.asarray(Image.open(io.BytesIO(buf.getvalue())))
    out = out[None] if out.ndim == 2 else out.transpose(2, 0, 1)
    return torch.from_numpy(out.copy()).float().div(255.0).to(img.device)
