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

from guardian_plugin.attacks.base import ATTACKS, Attack
from guardian_plugin.attacks.common import balance_loss, fresh_copy, norm_consts, tanh_to_input
from guardian_plugin.nets import GeneratorA


@ATTACKS.register("disguide")
class DisGUIDE(Attack):
    name = "disguide"
    label_modes = ("soft", "hard")

    def setup(self):
        p = self.params
        c, h, _ = self.image_shape
        self.nz = int(p.get("nz", 256))
        self.batch = int(p.get("batch_size", 256))
        self.replay_batches = int(p.get("replay_batches", 3))
        self.lam = float(p.get("balance_weight", 0.2))
        self.gen_steps = int(p.get("gen_steps", 1))
        self.other = fresh_copy(self.clone, self.seed + 1000).to(self.device)
        self.generator = GeneratorA(self.nz, c, h, int(p.get("ngf", 64))).to(self.device)
        self.output = str(p.get("output", "normalised"))
        self.mean, self.std = norm_consts(p, c, self.device)
        tanh_to_input(torch.zeros(1), self.output, self.mean, self.std)  # validate
        self.opt_g = torch.optim.Adam(self.generator.parameters(), lr=float(p.get("lr_g", 1e-4)))
        lr = float(p.get("lr_s", 0.03))
        self.opts = [torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
                     for m in (self.clone, self.other)]

    def to_input(self, t):
        return tanh_to_input(t, self.output, self.mean, self.std)

    def generator_step(self):
        self.generator.train()
        self.clone.eval()
        self.other.eval()
        x = self.to_input(self.generator(self.noise(self.batch, self.nz)))
        probs = torch.stack([F.softmax(self.clone(x), 1), F.softmax(self.other(x), 1)])  # (2, B, K)
        disagreement = probs.std(0).sum(1).mean()
        loss = -disagreement + self.lam * balance_loss(probs.mean(0))
        self.opt_g.zero_grad()
        loss.backward()
        self.opt_g.step()

    def clone_update(self, x, answers):
        for model, opt in zip((self.clone, self.other), self.opts):
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
            x = self.to_input(self.generator(self.noise(self.batch, self.nz)))
        self.clone_update(x, self.query(x))
        for _ in range(self.replay_batches):
            self.clone_update(*self.memory.sample(self.batch, self.device))
