"""DisGUIDE, disagreement-guided data-free model extraction (Rosenthal et al., AAAI 2023).

Facts followed (../shared/reference/attacks-and-defenses.md): two clones; the generator (GeneratorA)
is trained only through the clones, with no victim query: it maximises their disagreement (the
standard deviation of the two clones' softmax outputs) plus a class-balance term (lambda 0.2; the
sum p log p of the clones' mean prediction). Per iteration: one fresh victim-labelled batch of 256
(L1 on recovered logits in soft-label mode, cross-entropy on the argmax in hard-label mode) plus three
batches drawn from a replay buffer of everything queried; both clones learn from each. Clone SGD lr
0.03 (momentum 0.9, wd 5e-4), generator Adam 1e-4.

``output``: ``normalised`` (as published) or ``pixels`` (see
:func:`guardian_plugin.attacks.common.tanh_to_input`).

The reported clone (``self.clone``, the one evaluated) is the first of the two; the second
(:attr:`other`) has the same architecture, initialised from a different seed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from guardian_plugin.attacks.base import ATTACKS
from guardian_plugin.attacks.common import balance_loss
from guardian_plugin.attacks.generator import TanhGeneratorAttack, TanhGeneratorParams


@ATTACKS.register("disguide")
class DisGUIDE(TanhGeneratorAttack):
    label_modes = ("soft", "hard")
    students = 2

    class Params(TanhGeneratorParams):
        nz: int = 256
        batch_size: int = 256
        lr_s: float = Field(0.03, description="clone SGD lr, both clones (momentum 0.9, wd 5e-4)")
        replay_batches: int = Field(3, description="replayed batches per iteration (no query)")
        balance_weight: float = Field(0.2, description="weight of the class-balance term of the generator loss")
        gen_steps: int = Field(1, description="generator steps per iteration")

    def setup(self):
        super().setup()
        self.replay_batches, self.lam, self.gen_steps = (self.cfg.replay_batches, self.cfg.balance_weight,
                                                         self.cfg.gen_steps)

    def generator_step(self):
        self.generator.train()
        self.clone.eval()
        self.other.eval()
        x = self.generate()
        probs = torch.stack([F.softmax(self.clone(x), 1), F.softmax(self.other(x), 1)])  # (2, B, K)
        disagreement = probs.std(0).sum(1).mean()
        loss = -disagreement + self.lam * balance_loss(probs.mean(0))
        self.opt_g.zero_grad()
        loss.backward()
        self.opt_g.step()

    def clone_update(self, x, answers):
        for model, opt in zip(self.clones, self.opts):
            model.train()
            loss = self.clone_loss(model(x), answers)
            opt.zero_grad()
            loss.backward()
            opt.step()

    def step(self):
        for _ in range(self.gen_steps):
            self.generator_step()
        self.generator.eval()
        with torch.no_grad():
            x = self.generate()
        self.clone_update(x, self.query(x))
        for _ in range(self.replay_batches):
            self.clone_update(*self.memory.sample(self.batch, self.device))
