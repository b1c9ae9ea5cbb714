"""Dual Students, data-free model stealing with two students (Beetham et al., ICLR 2023, arXiv
2309.10058).

Facts followed (../shared/reference/attacks-and-defenses.md): two students; the generator
(GeneratorA) maximises the L1 distance between the students' logits, trained through the students
only (no victim query); both students learn from the victim's answers on fresh generator batches
(L1 on recovered logits in soft-label mode, cross-entropy on the argmax in hard-label mode).
1280 queries per iteration: five student steps of 256. Student SGD 0.1 (momentum 0.9, wd 5e-4),
lr x0.3 at 10/30/50% of the budget as in DFME; generator Adam 1e-4.

``output``: ``normalised`` (as published) or ``pixels`` (see
:func:`guardian_plugin.attacks.common.tanh_to_input`).

The reported clone (``self.clone``) is the first student; the second (:attr:`other`) has the same
architecture, initialised from a different seed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from guardian_plugin.attacks.base import ATTACKS, Attack
from guardian_plugin.attacks.common import fresh_copy, norm_consts, set_lr, tanh_to_input
from guardian_plugin.nets import GeneratorA


@ATTACKS.register("dual_students")
class DualStudents(Attack):
    name = "dual_students"
    label_modes = ("soft", "hard")

    def setup(self):
        p = self.params
        c, h, _ = self.image_shape
        self.nz = int(p.get("nz", 256))
        self.batch = int(p.get("batch_size", 256))
        self.student_steps = int(p.get("student_steps", 5))
        self.lr_s = float(p.get("lr_s", 0.1))
        self.other = fresh_copy(self.clone, self.seed + 1000).to(self.device)
        self.generator = GeneratorA(self.nz, c, h, int(p.get("ngf", 64))).to(self.device)
        self.output = str(p.get("output", "normalised"))
        self.mean, self.std = norm_consts(p, c, self.device)
        tanh_to_input(torch.zeros(1), self.output, self.mean, self.std)  # validate
        self.opt_g = torch.optim.Adam(self.generator.parameters(), lr=float(p.get("lr_g", 1e-4)))
        self.opts = [torch.optim.SGD(m.parameters(), lr=self.lr_s, momentum=0.9, weight_decay=5e-4)
                     for m in (self.clone, self.other)]
        self.milestones = [int(self.budget * f) for f in (0.1, 0.3, 0.5)]

    def to_input(self, t):
        return tanh_to_input(t, self.output, self.mean, self.std)

    def generator_step(self):
        self.generator.train()
        self.clone.eval()
        self.other.eval()
        x = self.to_input(self.generator(self.noise(self.batch, self.nz)))
        loss = -F.l1_loss(self.clone(x), self.other(x))  # maximise the students' disagreement
        self.opt_g.zero_grad()
        loss.backward()
        self.opt_g.step()

    def student_step(self):
        self.generator.eval()
        with torch.no_grad():
            x = self.to_input(self.generator(self.noise(self.batch, self.nz)))
        answers = self.query(x)
        for model, opt in zip((self.clone, self.other), self.opts):
            model.train()
            loss = self.clone_loss(model(x), answers)
            opt.zero_grad()
            loss.backward()
            opt.step()

    def step(self):
        lr = self.lr_s * 0.3 ** sum(self.queries >= m for m in self.milestones)
        for opt in self.opts:
            set_lr(opt, lr)
        self.generator_step()
        for _ in range(self.student_steps):
            self.student_step()
