"""What the attacks that train a generator on the fly share (DFME, MAZE, DisGUIDE, Dual Students, DaST),
written once: the generator and its optimiser, one or two clones and their optimisers, the clone lr
schedule, latent noise, the victim's normalisation constants and the generator-output -> victim-input
mapping. Each attack keeps only what differs (its losses and its iteration).

Also the parameters of the proxy GAN that DFMS and QUDA pretrain (:class:`ProxyGANParams`).

Construction order is part of an attack's behaviour: the generator is the only thing :meth:`setup`
builds from the global random stream (the second clone comes from its own seed and leaves the stream
alone), so a run with the same seed sends the same queries as before this base existed.
"""

from __future__ import annotations

import abc
from typing import List, Literal, Optional, Sequence

import torch
import torch.nn as nn
from pydantic import Field, field_validator

from guardian_plugin.attacks.base import Attack, AttackParams
from guardian_plugin.attacks.common import (check_output, cosine, fresh_copy, norm_consts, pretrain_proxy_gan,
                                            set_lr, tanh_to_input)
from guardian_plugin.nets import GeneratorA
from guardian_plugin.training.data import upsample


class GeneratorParams(AttackParams):
    nz: int = Field(100, description="generator latent size")
    batch_size: int = Field(256, description="images per generator batch (one query batch)")
    ngf: int = Field(64, description="generator width")


class GeneratorAttack(Attack):
    """An attack that trains a generator alongside its clone(s).

    Class settings: ``students`` (2: a second clone :attr:`other`, the same architecture initialised
    from ``seed + 1000``, trained alongside :attr:`clone`), ``lr_schedule`` for the clone lr
    (``constant``; ``steps``: x0.3 at the :meth:`milestone_fractions` of the budget; ``cosine`` over
    the budget; applied by :meth:`update_lr`). Subclasses build the generator and the optimisers
    (:meth:`build_generator`, :meth:`build_generator_optimizer`, :meth:`build_clone_optimizer`) and say how a
    generator output becomes a victim input (:meth:`to_input`).

    After :meth:`setup`: ``nz``, ``batch``, ``mean``/``std`` (1, C, 1, 1), ``generator``, ``opt_g``,
    ``clones`` (the clone, then :attr:`other`), ``opts`` (one optimiser per clone; ``opt_s`` the
    first), ``lr_s`` (the initial clone lr) and ``milestones`` (query counts).
    """

    Params = GeneratorParams
    students = 1
    lr_schedule = "constant"
    lr_milestones: Sequence[float] = (0.1, 0.3, 0.5)

    def setup(self) -> None:
        p = self.cfg
        c, h, _ = self.image_shape
        self.nz, self.batch = p.nz, p.batch_size
        self.mean, self.std = norm_consts(p.mean, p.std, self.device)
        self.clones: List[nn.Module] = [self.clone]
        if self.students == 2:
            self.other = fresh_copy(self.clone, self.seed + 1000).to(self.device)
            self.clones.append(self.other)
        self.generator = self.build_generator(c, h).to(self.device)
        self.opt_g = self.build_generator_optimizer()
        self.lr_s = self.initial_clone_lr()
        self.opts = [self.build_clone_optimizer(m) for m in self.clones]
        self.opt_s = self.opts[0]
        self.milestones = [int(self.budget * float(f)) for f in self.milestone_fractions()]

    # ----------------------------------------------------------------------------- subclasses
    @abc.abstractmethod
    def build_generator(self, channels: int, size: int) -> nn.Module:
        """(subclasses)"""

    @abc.abstractmethod
    def build_generator_optimizer(self) -> torch.optim.Optimizer:
        """(subclasses)"""

    @abc.abstractmethod
    def initial_clone_lr(self) -> float:
        """(subclasses)"""

    @abc.abstractmethod
    def build_clone_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """(subclasses)"""

    @abc.abstractmethod
    def to_input(self, out: torch.Tensor) -> torch.Tensor:
        """A generator output -> the victim's (normalised) input."""

    def milestone_fractions(self) -> Sequence[float]:
        return self.lr_milestones

    # -------------------------------------------------------------------------------- helpers
    def z(self, n: Optional[int] = None) -> torch.Tensor:
        """Latent noise for ``n`` images (default: one batch)."""
        return self.noise(self.batch if n is None else n, self.nz)

    def clone_lr(self) -> float:
        """The clone lr at the current query count, by :attr:`lr_schedule`."""
        if self.lr_schedule == "steps":
            return self.lr_s * 0.3 ** sum(self.queries >= m for m in self.milestones)
        if self.lr_schedule == "cosine":
            return cosine(self.lr_s, self.queries, self.budget)
        return self.lr_s

    def update_lr(self) -> None:
        lr = self.clone_lr()
        for opt in self.opts:
            set_lr(opt, lr)


class TanhGeneratorParams(GeneratorParams):
    lr_g: float = Field(1e-4, description="generator Adam lr")
    lr_s: float = Field(0.1, description="clone SGD lr (momentum 0.9, wd 5e-4)")
    output: str = Field("normalised", description="`normalised` (tanh output used as the victim's normalised "
                                                  "input, as published) or `pixels` (mapped to [0, 1] pixels, "
                                                  "then normalised)")

    upsample_from: Optional[int] = Field(None, ge=4, description="generator output size in px, upsampled "
                                         "(differentiably) to the victim's size before every query, as "
                                         "attacks on 224 px models do (null: the victim's size)")
    upsample_mode: Literal["nearest", "bilinear", "bicubic"] = Field("bilinear", description="how "
                                                                     "`upsample_from` images are upsampled")

    @field_validator("output")
    @classmethod
    def _output(cls, v: str) -> str:
        return check_output(v)


class TanhGeneratorAttack(GeneratorAttack):
    """GeneratorA (tanh output) trained with Adam (``lr_g``); clones trained with SGD (``lr_s``, momentum
    0.9, weight decay 5e-4); the tanh output mapped to victim inputs by ``output`` (see
    :func:`guardian_plugin.attacks.common.tanh_to_input`). DFME, MAZE, DisGUIDE, Dual Students."""

    Params = TanhGeneratorParams

    def setup(self) -> None:
        self.output = self.cfg.output
        self.input_size = self.image_shape[1]
        if (self.cfg.upsample_from or 0) > self.input_size:
            raise ValueError(f"{self.name}: upsample_from ({self.cfg.upsample_from}) is above the victim's "
                             f"{self.input_size} px")
        super().setup()

    def build_generator(self, channels: int, size: int) -> nn.Module:
        return GeneratorA(self.nz, channels, self.cfg.upsample_from or size, self.cfg.ngf)

    def build_generator_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.generator.parameters(), lr=self.cfg.lr_g)

    def initial_clone_lr(self) -> float:
        return self.cfg.lr_s

    def build_clone_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=self.lr_s, momentum=0.9, weight_decay=5e-4)

    def to_input(self, t: torch.Tensor) -> torch.Tensor:
        """The tanh output (any leading dims) -> the victim's input: upsampled to the victim's size
        (``upsample_from``, differentiable; the generator's own gradients and zeroth-order estimates
        stay at the generator's size) and mapped by ``output``."""
        return tanh_to_input(upsample(t, self.input_size, self.cfg.upsample_mode, (-1.0, 1.0)), self.output,
                             self.mean, self.std)

    def generate(self, n: Optional[int] = None) -> torch.Tensor:
        """Victim inputs from fresh noise (``n`` images, default one batch), in the generator's current mode."""
        return self.to_input(self.generator(self.z(n)))


# ------------------------------------------------------------------------------- proxy GAN
class ProxyGANParams(AttackParams):
    """The proxy DCGAN that DFMS and QUDA pretrain without any victim query
    (:func:`guardian_plugin.attacks.common.pretrain_proxy_gan`, cached under ``cache_dir``)."""

    nz: int = Field(100, description="GAN latent size")
    batch_size: int = Field(256, description="images per query batch")
    proxy: str = Field("photos", description="proxy data: `photos`, `photos:<group>` or `shapes`")
    gan_width: int = Field(32, description="proxy GAN width")
    gan_steps: int = Field(1000, description="proxy GAN pretraining steps")
    proxy_images: int = Field(4000, description="proxy images the GAN is trained on")
    gan_seed: int = Field(0, description="seed of the proxy GAN's training")


def proxy_gan(attack: Attack):
    """(generator, discriminator, proxy images) for ``attack`` from its :class:`ProxyGANParams`."""
    p = attack.cfg
    c, h, _ = attack.image_shape
    return pretrain_proxy_gan(p.proxy, h, c, nz=p.nz, width=p.gan_width, steps=p.gan_steps, n_images=p.proxy_images,
                              seed=p.gan_seed, cache_dir=p.cache_dir, device=attack.device, progress=attack.progress)
