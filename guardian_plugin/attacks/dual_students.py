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
from pydantic import Field

from guardian_plugin.attacks.base import ATTACKS
from guardian_plugin.attacks.generator import TanhGeneratorAttack, TanhGeneratorParams


@ATTACKS.register("dual_students")
class DualStudents(TanhGeneratorAttack):
    label_modes = ("soft", "hard")
    students = 2
    lr_schedule = "steps"  # x0.3 at 10/30/50% of the budget, as in DFME (not configurable)

    class Params(TanhGeneratorParams):
        nz: int = 256
        batch_size: int = 256
        student_steps: int = Field(5, description="student steps (one query batch each) per iteration")

    def generator_step(self):
        self.generator.train()
        self.clone.eval()
        self.other.eval()
        x = self.generate()
        loss = -F.l1_loss(self.clone(x), self.other(x))  # maximise the students' disagreement
        self.opt_g.zero_grad()
        loss.backward()
        self.opt_g.step()

    def student_step(self):
        self.generator.eval()
        with torch.no_grad():
            x = self.generate()
        answers = self.query(x)
        for model, opt in zip(self.clones, self.opts):
            model.train()
            loss = self.clone_loss(model(x), answers)
            opt.zero_grad()
            loss.backward()
            opt.step()

    def step(self):
        self.update_lr()
        self.generator_step()
        for _ in range(self.cfg.student_steps):
            self.student_step()
