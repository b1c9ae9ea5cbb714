"""Synthetic sources for the detector's fake classes, one registry entry each.

A source turns the training context into ``n`` uint8 pixel images (N, C, H, W). Every source can be
replaced by an ImageFolder of images the defender already has: ``{kind: folder, path: DIR}``.

- ``dfme``       simulate DFME against the defender's own victim (zeroth-order generator training)
                 and sample its generator at several checkpoints
- ``gan``        a DCGAN trained on the defender's real data
- ``diffusion``  a small DDPM trained on the defender's real data (diffusers), sampled with DDIM
- ``folder``     images from a directory
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np
import torch

from guardian_plugin.registry import Registry
from guardian_plugin.training.data import denormalise, image_folder, to_uint8

SOURCES: Registry = Registry("synthetic source")
log = logging.getLogger(__name__)


class SourceContext:
    """What sources may use: real training images in [0, 1], the victim and its normalisation."""

    def __init__(self, real01: torch.Tensor, victim=None, mean=None, std=None, num_classes: int = 10,
                 device="cpu", seed: int = 0, progress: bool = True):
        self.real01 = real01
        self.victim = victim
        self.mean, self.std = mean, std
        self.num_classes = num_classes
        self.device = device
        self.seed = seed
        self.progress = progress
        self.channels, self.size = real01.shape[1], real01.shape[-1]
        self.info: dict = {}  # what the source measured (written to report.json)


@SOURCES.register("dfme")
def dfme_source(ctx: SourceContext, n: int, budget: int = 15_000, checkpoints: int = 5, runs: int = 1,
                variants: list | None = None, batch_size: int = 128, clone_arch: str = "lenet5",
                eval_share: float = 0.25, **params) -> np.ndarray:
    """DFME against the victim (no defence). For every variant (a dict of DFME settings, e.g. its
    ``output`` mode or ``lr_g``) ``runs`` independent attacks are run (seeds 1000 + seed + k, apart
    from any seed an evaluation uses), each generator sampled at its initial state and at
    ``checkpoints`` evenly spaced points of its budget. Samples are drawn as the attack sends them
    (train-mode batch statistics), ``eval_share`` of them with the running statistics instead.

    One long run sampled late teaches the detector one generator: measured on the MNIST example, a
    detector trained that way flagged 0% of another seed's generator before ~5k queries and 52% at
    10k, so an attacker's first queries passed. Early states, several runs and variants cover that."""
    if ctx.victim is None:
        raise ValueError("source 'dfme' needs the victim model (config: victim)")
    import copy

    from guardian_plugin.attacks.dfme import DFME
    from guardian_plugin.attacks.target import InProcessTarget
    from guardian_plugin.nets import build_classifier

    states, queries, k = [], 0, 0
    for variant in variants or [{}]:
        for _ in range(runs):
            seed = 1000 + ctx.seed + k
            k += 1
            target = InProcessTarget(ctx.victim, ctx.num_classes, device=ctx.device)
            torch.manual_seed(seed)
            clone = build_classifier(clone_arch, in_channels=ctx.channels, num_classes=ctx.num_classes,
                                     image_size=ctx.size)
            atk = DFME(target, clone, budget=budget, image_shape=(ctx.channels, ctx.size, ctx.size),
                       device=ctx.device, seed=seed, progress=ctx.progress, batch_size=batch_size,
                       checkpoint_every=max(budget // checkpoints, 1), mean=ctx.mean, std=ctx.std,
                       **{**params, **variant})
            initial = copy.deepcopy(atk.generator.state_dict())
            atk.run()
            if atk.queries != target.queries:
                raise RuntimeError(f"query accounting mismatch: attack {atk.queries}, target {target.queries}")
            queries += atk.queries
            states += [(atk, sd) for sd in [initial] + atk.checkpoints]
    per = [n // len(states) + (1 if i < n % len(states) else 0) for i in range(len(states))]
    imgs = []
    for m, (a, sd) in zip(per, states):
        n_eval = int(round(m * eval_share))
        for mode, cnt in (("train", m - n_eval), ("eval", n_eval)):
            if cnt:
                imgs.append(denormalise(a.sample(cnt, sd, mode=mode).cpu(), ctx.mean, ctx.std))
    ctx.info["dfme"] = {"queries": queries, "runs": k, "generator_states": len(states)}
    return to_uint8(torch.cat(imgs))


@SOURCES.register("gan")
def gan_source(ctx: SourceContext, n: int, epochs: int = 20, width: int = 32, nz: int = 64, **params) -> np.ndarray:
    from guardian_plugin.training.gan import sample_generator, train_dcgan

    g, _, hist = train_dcgan(ctx.real01, epochs=epochs, width=width, nz=nz, seed=ctx.seed, device=ctx.device,
                             progress=ctx.progress, desc="gan source", **params)
    ctx.info["gan"] = {"epochs": epochs, "history": hist[-1:]}
    return to_uint8(sample_generator(g, n, seed=ctx.seed + 1, device=ctx.device))


@SOURCES.register("diffusion")
def diffusion_source(ctx: SourceContext, n: int, steps: int = 1500, width: int = 16, sample_steps: int = 50,
                     **params) -> np.ndarray:
    from guardian_plugin.training.diffusion import sample_ddim, train_ddpm

    unet, hist = train_ddpm(ctx.real01, steps=steps, width=width, seed=ctx.seed, device=ctx.device,
                            progress=ctx.progress, **params)
    ctx.info["diffusion"] = {"train_steps": steps, "sample_steps": sample_steps, "history": hist[-1:]}
    return to_uint8(sample_ddim(unet, n, ctx.size, ctx.channels, steps=sample_steps, seed=ctx.seed + 1,
                                device=ctx.device, progress=ctx.progress))


@SOURCES.register("folder")
def folder_source(ctx: SourceContext, n: int, path: str = "", **_) -> np.ndarray:
    x = image_folder(path, ctx.size, ctx.channels)
    if len(x) < n:
        log.warning("folder source %s has %d images, fewer than the %d asked for", path, len(x), n)
    idx = np.random.RandomState(ctx.seed).permutation(len(x))[:n]
    return x[idx]


dfme_source.uses_victim = True  # the others never touch ctx.victim: their cache keys leave it out


def build_source(kind: str) -> Callable[..., np.ndarray]:
    return SOURCES.get(kind)


def uses_victim(kind: str) -> bool:
    """Whether a source's images depend on the victim (its cache key must then include the victim)."""
    return bool(getattr(SOURCES.get(kind), "uses_victim", False))
