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

import torch
import torch.nn as nn
import torch.nn.functional as F

from guardian_plugin.attacks.base import ATTACKS, Attack
from guardian_plugin.attacks.common import norm_consts, to_input


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
class DaST(Attack):
    name = "dast"
    label_modes = ("soft", "hard")

    def setup(self):
        p = self.params
        c, h, _ = self.image_shape
        self.num_classes = int(p.get("num_classes", 10))
        self.nz = int(p.get("nz", 100))
        self.batch = int(p.get("batch_size", 500))
        if self.batch < 2 * self.num_classes:  # each class branch normalises its share of the batch
            raise ValueError(f"dast: batch_size {self.batch} must be at least 2 x num_classes "
                             f"({2 * self.num_classes}): every class branch's batch norm needs two images")
        self.alpha = float(p.get("alpha", 0.2))
        self.beta = float(p.get("beta", 0.1 if self.label_mode == "soft" else 0.0))
        self.mean, self.std = norm_consts(p, c, self.device)
        self.generator = DaSTGenerator(self.nz, c, h, self.num_classes, int(p.get("ngf", 64))).to(self.device)
        lr = float(p.get("lr", 1e-4))
        self.opt_g = torch.optim.Adam(self.generator.parameters(), lr=lr, betas=(0.5, 0.999))
        self.opt_s = torch.optim.Adam(self.clone.parameters(), lr=lr, betas=(0.5, 0.999))

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
        x = to_input(self.generator(self.noise(self.batch, self.nz), labels), self.mean, self.std)
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
