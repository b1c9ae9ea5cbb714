"""MAZE, data-free model stealing with zeroth-order gradient estimation (Kariyappa et al., CVPR 2021).

Facts followed (../shared/reference/attacks-and-defenses.md): a GeneratorA-shaped generator with
latent 100; the generator maximises KL(victim || clone) on its images, its gradient estimated from
the victim's answers with m=10 random unit directions over the whole image (eps=1e-3, forward
differences on the pre-tanh output); five clone KL steps per iteration, the first on the unperturbed
images the generator step already paid for, then four fresh batches; every queried (image, answer)
pair is kept and replayed for ten further clone steps that cost no query. Batch 128, clone SGD 0.1
(momentum 0.9, wd 5e-4) with a cosine schedule over the budget, generator Adam 1e-4.
Queries per iteration: batch * ((m + 1) + clone_steps - 1) = 1920. Soft labels only (as published).
``output``: ``normalised`` (as published) or ``pixels`` (see
:func:`guardian_plugin.attacks.common.tanh_to_input`).
"""

from __future__ import annotations

import torch

from guardian_plugin.attacks.base import ATTACKS, Attack
from guardian_plugin.attacks.common import cosine, kl_to_answers, norm_consts, set_lr, tanh_to_input
from guardian_plugin.nets import GeneratorA


@ATTACKS.register("maze")
class MAZE(Attack):
    name = "maze"
    label_modes = ("soft",)

    def setup(self):
        p = self.params
        self.nz = int(p.get("nz", 100))
        self.batch = int(p.get("batch_size", 128))
        self.m = int(p.get("m", 10))
        self.eps = float(p.get("eps", 1e-3))
        self.clone_steps = int(p.get("clone_steps", 5))
        self.replay_steps = int(p.get("replay_steps", 10))
        self.lr_s = float(p.get("lr_s", 0.1))
        c, h, _ = self.image_shape
        self.generator = GeneratorA(self.nz, c, h, int(p.get("ngf", 64))).to(self.device)
        self.opt_g = torch.optim.Adam(self.generator.parameters(), lr=float(p.get("lr_g", 1e-4)))
        self.opt_s = torch.optim.SGD(self.clone.parameters(), lr=self.lr_s, momentum=0.9, weight_decay=5e-4)
        self.output = str(p.get("output", "normalised"))
        self.mean, self.std = norm_consts(p, c, self.device)
        tanh_to_input(torch.zeros(1), self.output, self.mean, self.std)  # validate

    def to_input(self, t):
        return tanh_to_input(t, self.output, self.mean, self.std)

    def clone_loss(self, logits, answers):
        return kl_to_answers(logits, answers)

    def _per_sample_kl(self, x, probs):
        logp = torch.log_softmax(self.clone(x), 1)
        return (probs * (probs.clamp_min(1e-8).log() - logp)).sum(1)

    def generator_step(self):
        """One ZO step; returns the unperturbed images and their answers for the first clone step."""
        self.generator.train()
        self.clone.eval()
        pre_x = self.generator(self.noise(self.batch, self.nz), pre_x=True)
        x0 = pre_x.detach()
        dim = x0[0].numel()
        u = torch.randn(self.m, *x0.shape, device=self.device)
        u = u / u.flatten(2).norm(dim=2).view(self.m, -1, 1, 1, 1)
        base = self.to_input(torch.tanh(x0))
        pts = torch.cat([self.to_input(torch.tanh(x0 + self.eps * u)).flatten(0, 1), base])
        with torch.no_grad():
            probs = self.query(pts)
            loss = -self._per_sample_kl(pts, probs)  # the generator maximises KL(victim || clone)
        l_u = loss[: self.m * self.batch].view(self.m, self.batch)
        l_0 = loss[self.m * self.batch:]
        grad = dim * (((l_u - l_0) / self.eps).view(self.m, self.batch, 1, 1, 1) * u).mean(0) / self.batch
        self.opt_g.zero_grad()
        pre_x.backward(grad)
        self.opt_g.step()
        return base, probs[self.m * self.batch:]

    def _clone_update(self, x, probs):
        self.clone.train()
        loss = self.clone_loss(self.clone(x), probs)
        self.opt_s.zero_grad()
        loss.backward()
        self.opt_s.step()

    def step(self):
        set_lr(self.opt_s, cosine(self.lr_s, self.queries, self.budget))
        x, probs = self.generator_step()
        self._clone_update(x, probs)
        self.generator.eval()
        for _ in range(self.clone_steps - 1):
            with torch.no_grad():
                x = self.to_input(self.generator(self.noise(self.batch, self.nz)))
            self._clone_update(x, self.query(x))
        for _ in range(self.replay_steps):  # experience replay: no new queries
            self._clone_update(*self.memory.sample(self.batch, self.device))
