"""DaST, data-free substitute training (Zhou et al., CVPR 2020).

Facts followed (../shared/reference/attacks-and-defenses.md): no zeroth-order estimate; the generator
learns only through the substitute (the clone). The generator has one branch per class feeding a
shared trunk, sigmoid output in [0, 1] pixels (normalised with the victim's constants before a query);
each batch is split evenly across the branches. Substitute loss CE(S(x), argmax victim) + beta *
MSE(softmax S(x), victim probabilities): beta=0.1 in soft-label mode ("DaST-P"), beta=0 in hard-label
mode ("DaST-L"). Generator loss exp(-substitute loss) + alpha * CE(S(x), branch label), alpha=0.2
(kept constant here). Adam lr 1e-4, beta1 0.5 for both. One batch of 500 queries per iteration.

Branch shape (chosen here, the facts do not fix it): per class Linear(nz -> 2*ngf*(H/4)^2) + BN + ReLU;
shared trunk nearest x2 -> Conv3 -> BN -> LeakyReLU -> nearest x2 -> Conv3 -> BN -> LeakyReLU -> Conv3
-> sigmoid.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field, model_validator

from guardian_plugin.attacks.base import ATTACKS
from guardian_plugin.attacks.common import to_input
from guardian_plugin.attacks.generator import GeneratorAttack, GeneratorParams


class DaSTGenerator(nn.Module):
    def __init__(self, nz: int = 100, channels: int = 1, size: int = 28, num_classes: int = 10, ngf: int = 64):
        super().__init__()
        self.nz, self.s0, self.ngf, self.num_classes = nz, size // 4, ngf, num_classes
        feat = ngf * 2 * self.s0 * self.s0
        self.branches = nn.ModuleList(
            nn.Sequential(nn.Linear(nz, feat), nn.BatchNorm1d(feat), nn.ReLU()) for _ in range(num_classes))
        self.trunk = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ngf * 2, ngf * 2, 3, 1, 1, bias=False),
            nn.BatchNorm2d(ngf * 2), nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ngf * 2, ngf, 3, 1, 1, bias=False),
            nn.BatchNorm2d(ngf), nn.LeakyReLU(0.2),
            nn.Conv2d(ngf, channels, 3, 1, 1), nn.Sigmoid())

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = z.new_empty(z.shape[0], self.ngf * 2 * self.s0 * self.s0)
        for k in labels.unique().tolist():
            idx = (labels == k).nonzero(as_tuple=True)[0]
            h[idx] = self.branches[k](z[idx])
        return self.trunk(h.view(-1, self.ngf * 2, self.s0, self.s0))


@ATTACKS.register("dast")
class DaST(GeneratorAttack):
    label_modes = ("soft", "hard")

    class Params(GeneratorParams):
        nz: int = 100
        batch_size: int = 500
        lr: float = Field(1e-4, description="Adam lr (beta1 0.5) of the generator and the substitute")
        alpha: float = Field(0.2, description="weight of the generator's branch-label cross-entropy")
        beta: Optional[float] = Field(None, description="weight of the substitute's MSE on probabilities "
                                                        "(default 0.1 with soft labels, 0 with hard)")

        @model_validator(mode="after")
        def _batch_covers_the_branches(self):
            if self.batch_size < 2 * self.num_classes:  # each class branch normalises its share of the batch
                raise ValueError(f"dast: batch_size {self.batch_size} must be at least 2 x num_classes "
                                 f"({2 * self.num_classes}): every class branch's batch norm needs two images")
            return self

    def setup(self):
        self.num_classes = self.cfg.num_classes
        self.alpha = self.cfg.alpha
        self.beta = self.cfg.beta if self.cfg.beta is not None else (0.1 if self.label_mode == "soft" else 0.0)
        super().setup()

    def build_generator(self, channels: int, size: int) -> nn.Module:
        return DaSTGenerator(self.nz, channels, size, self.num_classes, self.cfg.ngf)

    def build_generator_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.generator.parameters(), lr=self.cfg.lr, betas=(0.5, 0.999))

    def initial_clone_lr(self) -> float:
        return self.cfg.lr

    def build_clone_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.Adam(model.parameters(), lr=self.lr_s, betas=(0.5, 0.999))

    def to_input(self, pix: torch.Tensor) -> torch.Tensor:
        """The sigmoid generator's [0, 1] pixels, normalised with the victim's constants."""
        return to_input(pix, self.mean, self.std)

    def _labels(self):
        per = self.batch // self.num_classes
        labels = torch.arange(self.num_classes, device=self.device).repeat_interleave(per)
        extra = self.batch - labels.numel()
        if extra:
            labels = torch.cat([labels, torch.randint(self.num_classes, (extra,), device=self.device)])
        return labels

    def sub_loss(self, logits, answers):
        loss = F.cross_entropy(logits, answers.argmax(1))
        if self.beta > 0:
            loss = loss + self.beta * F.mse_loss(F.softmax(logits, 1), answers)
        return loss

    def clone_loss(self, logits, answers):
        return self.sub_loss(logits, answers)

    def step(self):
        labels = self._labels()
        self.generator.train()
        x = self.to_input(self.generator(self.z(), labels))
        answers = self.query(x.detach())
        # substitute step on the answered images
        self.clone.train()
        loss_s = self.sub_loss(self.clone(x.detach()), answers)
        self.opt_s.zero_grad()
        loss_s.backward()
        self.opt_s.step()
        # generator step through the substitute only (the victim's answers are constants)
        out = self.clone(x)
        loss_g = torch.exp(-self.sub_loss(out, answers)) + self.alpha * F.cross_entropy(out, labels)
        self.opt_g.zero_grad()
        loss_g.backward()
        self.opt_g.step()
