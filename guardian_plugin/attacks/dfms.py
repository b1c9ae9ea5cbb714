"""DFMS-HL, data-free model stealing in the hard-label setting (Sanyal et al., CVPR 2022).

Facts followed (../shared/reference/attacks-and-defenses.md): proxy data instead of the victim's;
a DCGAN (nz=100) is first trained on proxy images WITHOUT any victim query, then the attack
alternates: label G(z) (with augmentation) by the victim's argmax and train the student with
cross-entropy; train the generator with the DCGAN adversarial loss against the proxy images plus a
class-balance term, 500 * sum_k pbar_k log pbar_k of the student's mean prediction (pushes the
generated batch to spread over all classes); the discriminator keeps training on proxy vs generated.
Generator Adam 2e-4 (beta1 0.5), student SGD 0.1 (momentum 0.9, wd 5e-4) with a cosine schedule.

Proxy data here (never the victim's): ``proxy: photos`` crops of the scikit-image / scikit-learn
photographs the detector never trains on (default), or ``proxy: shapes``, DFMS's synthetic shapes.
The GAN is smaller than the paper's and pretrained for ``gan_steps`` steps (cached in ``cache_dir``).
``label_mode: soft`` gives the soft-label variant (KL to the victim's probabilities).
Augmentation: random shifts of up to 2 px (flips would change digits).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from guardian_plugin.attacks.base import ATTACKS, Attack
from guardian_plugin.attacks.common import (augment_shift, balance_loss, cosine, kl_to_answers, norm_consts, set_lr,
                                            to_input)
from guardian_plugin.attacks.generator import ProxyGANParams, proxy_gan


@ATTACKS.register("dfms")
class DFMS(Attack):
    label_modes = ("hard", "soft")

    class Params(ProxyGANParams):
        balance_weight: float = Field(500.0, description="weight of the class-balance term of the generator loss")
        shift: int = Field(2, description="random shifts of up to this many pixels (augmentation)")
        lr_s: float = Field(0.1, description="student SGD lr (momentum 0.9, wd 5e-4), cosine schedule")
        lr_g: float = Field(2e-4, description="generator Adam lr (beta1 0.5)")
        lr_d: float = Field(2e-4, description="discriminator Adam lr (beta1 0.5)")

    def __init__(self, *args, label_mode: str = "hard", **kw):
        super().__init__(*args, label_mode=label_mode, **kw)

    def setup(self):
        p = self.cfg
        self.nz, self.batch, self.lam, self.shift, self.lr_s = p.nz, p.batch_size, p.balance_weight, p.shift, p.lr_s
        self.mean, self.std = norm_consts(p.mean, p.std, self.device)
        self.generator, self.disc, self.real = proxy_gan(self)
        self.opt_g = torch.optim.Adam(self.generator.parameters(), lr=p.lr_g, betas=(0.5, 0.999))
        self.opt_d = torch.optim.Adam(self.disc.parameters(), lr=p.lr_d, betas=(0.5, 0.999))
        self.opt_s = torch.optim.SGD(self.clone.parameters(), lr=self.lr_s, momentum=0.9, weight_decay=5e-4)

    def clone_loss(self, logits, answers):
        if self.label_mode == "hard":
            return F.cross_entropy(logits, answers.argmax(1))
        return kl_to_answers(logits, answers)

    def step(self):
        set_lr(self.opt_s, cosine(self.lr_s, self.queries, self.budget))
        # 1. student on victim-labelled generated images
        self.generator.eval()
        with torch.no_grad():
            pix = augment_shift(self.generator(self.noise(self.batch, self.nz)), self.shift)
            x = to_input(pix, self.mean, self.std)
        answers = self.query(x)
        self.clone.train()
        loss_s = self.clone_loss(self.clone(x), answers)
        self.opt_s.zero_grad()
        loss_s.backward()
        self.opt_s.step()
        # 2. generator: adversarial loss + class balance through the student (no query)
        self.generator.train()
        self.clone.eval()
        fake = self.generator(self.noise(self.batch, self.nz))
        probs = F.softmax(self.clone(to_input(fake, self.mean, self.std)), 1)
        loss_g = F.softplus(-self.disc(fake)).mean() + self.lam * balance_loss(probs)
        self.opt_g.zero_grad()
        loss_g.backward()
        self.opt_g.step()
        # 3. discriminator: proxy images vs generated
        xr = self.real[torch.randint(len(self.real), (self.batch,))].to(self.device)
        loss_d = F.softplus(-self.disc(xr)).mean() + F.softplus(self.disc(fake.detach())).mean()
        self.opt_d.zero_grad()
        loss_d.backward()
        self.opt_d.step()
