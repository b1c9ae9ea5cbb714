"""QUDA, query-limited data-free model extraction (Lin et al., AsiaCCS 2023) -- an APPROXIMATION.

There is no public code. What the paper describes and what is kept: a GAN pretrained on public data
unrelated to the victim's task serves as an image prior, and the attacker learns WHICH latent codes
to query so that few queries teach the clone much, the clone being trained on the victim's answers.

What is approximated, exactly:
- The prior is the small DCGAN of :func:`guardian_plugin.attacks.common.pretrain_proxy_gan`, trained
  here on crops of the scikit-image / scikit-learn photographs (``proxy: photos``, the group the
  detector never sees) or DFMS's synthetic shapes, not an ImageNet-scale GAN. It stays frozen.
- The paper's deep reinforcement-learning agent is replaced by a one-step policy-gradient bandit: a
  Gaussian latent policy z ~ N(mu_theta(e), sigma^2 I), e ~ N(0, I), mu_theta a two-layer MLP
  initialised to the identity map, trained with REINFORCE (mean-reward baseline). The reward of a
  queried sample is the clone's disagreement with the victim on it BEFORE the clone learns from it:
  KL(victim || clone) with soft labels, cross-entropy to the victim's argmax with hard labels.
- Query selection: ``candidates`` x batch latents are drawn from the policy and the batch with the
  highest clone entropy is sent (uncertainty sampling); unsent candidates cost nothing.
- Clone training: the fresh batch plus ``replay_batches`` batches from the memory of everything
  answered (KL or cross-entropy), SGD 0.05 with a cosine schedule.
Every image sent is one query; selection happens on the attacker's side before sending.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pydantic import Field

from guardian_plugin.attacks.base import ATTACKS, Attack
from guardian_plugin.attacks.common import cosine, kl_to_answers, norm_consts, set_lr, to_input
from guardian_plugin.attacks.generator import ProxyGANParams, proxy_gan


class LatentPolicy(nn.Module):
    """mu_theta(e) = e + MLP(e), the MLP's last layer starting at zero (identity at the start)."""

    def __init__(self, nz: int, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(nz, hidden), nn.ReLU(), nn.Linear(hidden, nz))
        nn.init.zeros_(self.net[2].weight)
        nn.init.zeros_(self.net[2].bias)

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return e + self.net(e)


@ATTACKS.register("quda")
class QUDA(Attack):
    label_modes = ("soft", "hard")

    class Params(ProxyGANParams):
        candidates: int = Field(4, description="candidate batches drawn per batch sent (the most uncertain is sent)")
        sigma: float = Field(0.5, description="std of the Gaussian latent policy")
        replay_batches: int = Field(3, description="replayed batches per iteration (no query)")
        lr_s: float = Field(0.05, description="clone SGD lr (momentum 0.9, wd 5e-4), cosine schedule")
        lr_policy: float = Field(1e-3, description="latent policy Adam lr")

    def setup(self):
        p = self.cfg
        self.nz, self.batch, self.candidates, self.sigma = p.nz, p.batch_size, p.candidates, p.sigma
        self.replay_batches, self.lr_s = p.replay_batches, p.lr_s
        self.mean, self.std = norm_consts(p.mean, p.std, self.device)
        self.generator, _, _ = proxy_gan(self)
        self.generator.eval()
        for q in self.generator.parameters():
            q.requires_grad_(False)
        self.policy = LatentPolicy(self.nz).to(self.device)
        self.opt_p = torch.optim.Adam(self.policy.parameters(), lr=p.lr_policy)
        self.opt_s = torch.optim.SGD(self.clone.parameters(), lr=self.lr_s, momentum=0.9, weight_decay=5e-4)
        self.rewards = []  # mean reward per iteration (what the policy sees)

    def clone_loss(self, logits, answers):
        if self.label_mode == "hard":
            return F.cross_entropy(logits, answers.argmax(1))
        return kl_to_answers(logits, answers)

    def _per_sample_disagreement(self, logits, answers):
        if self.label_mode == "hard":
            return F.cross_entropy(logits, answers.argmax(1), reduction="none")
        p = answers.clamp_min(1e-8)
        return (p * (p.log() - F.log_softmax(logits, 1))).sum(1)

    def step(self):
        set_lr(self.opt_s, cosine(self.lr_s, self.queries, self.budget))
        n = self.batch * self.candidates
        e = self.noise(n, self.nz)
        mu = self.policy(e)
        z = (mu + self.sigma * torch.randn_like(mu)).detach()
        with torch.no_grad():
            x_all = to_input(self.generator(z), self.mean, self.std)
            self.clone.eval()
            logp = F.log_softmax(self.clone(x_all), 1)
            entropy = -(logp.exp() * logp).sum(1)
        pick = entropy.topk(self.batch).indices
        x = x_all[pick]
        answers = self.query(x)
        with torch.no_grad():
            reward = self._per_sample_disagreement(self.clone(x), answers)
        self.rewards.append(float(reward.mean()))
        # REINFORCE on the sent latents: grad log N(z; mu, sigma^2) * advantage
        logprob = -((z[pick] - mu[pick]) ** 2).sum(1) / (2 * self.sigma ** 2)
        adv = (reward - reward.mean()) / (reward.std() + 1e-8)
        loss_p = -(logprob * adv).mean()
        self.opt_p.zero_grad()
        loss_p.backward()
        self.opt_p.step()
        # clone on the fresh batch and replayed ones
        self.clone.train()
        batches = [(x, answers)] + [self.memory.sample(self.batch, self.device) for _ in range(self.replay_batches)]
        for xb, yb in batches:
            loss = self.clone_loss(self.clone(xb), yb)
            self.opt_s.zero_grad()
            loss.backward()
            self.opt_s.step()
