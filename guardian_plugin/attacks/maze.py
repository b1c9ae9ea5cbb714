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
from pydantic import Field

from guardian_plugin.attacks.base import ATTACKS
from guardian_plugin.attacks.common import kl_to_answers
from guardian_plugin.attacks.generator import TanhGeneratorAttack, TanhGeneratorParams


@ATTACKS.register("maze")
class MAZE(TanhGeneratorAttack):
    label_modes = ("soft",)
    lr_schedule = "cosine"

    class Params(TanhGeneratorParams):
        nz: int = 100
        batch_size: int = 128
        m: int = Field(10, description="random directions of the zeroth-order gradient estimate")
        eps: float = Field(1e-3, description="step of the zeroth-order estimate (pre-tanh)")
        clone_steps: int = Field(5, description="clone KL steps per iteration (the first on the ZO batch)")
        replay_steps: int = Field(10, description="extra clone steps on replayed answers per iteration (no query)")

    def setup(self):
        super().setup()
        self.m, self.eps = self.cfg.m, self.cfg.eps
        self.clone_steps, self.replay_steps = self.cfg.clone_steps, self.cfg.replay_steps

    def clone_loss(self, logits, answers):
        return kl_to_answers(logits, answers)

    def _per_sample_kl(self, x, probs):
        logp = torch.log_softmax(self.clone(x), 1)
        return (probs * (probs.clamp_min(1e-8).log() - logp)).sum(1)

    def generator_step(self):
        """One ZO step; returns the unperturbed images and their answers for the first clone step."""
        self.generator.train()
        self.clone.eval()
        pre_x = self.generator(self.z(), pre_x=True)
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
        self.update_lr()
        x, probs = self.generator_step()
        self._clone_update(x, probs)
        self.generator.eval()
        for _ in range(self.clone_steps - 1):
            with torch.no_grad():
                x = self.generate()
            self._clone_update(x, self.query(x))
        for _ in range(self.replay_steps):  # experience replay: no new queries
            self._clone_update(*self.memory.sample(self.batch, self.device))
