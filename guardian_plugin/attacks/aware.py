"""Attackers who know the defense (beyond the paper), as strategies layered on any attack.

``build_aware_attack("dfme", {"invert_dpreds": {}}, target, clone, budget=..., ...)`` returns the
base attack with the strategies applied to every query it sends; strategies combine freely.

- ``invert_dpreds``: DPreds answers p' = (p + d) / (1 + K d). The smallest returned probability
  m' = (p_min + d) / (1 + K d) with p_min ~ 0 gives d ~ m' / (1 - K m'); the attacker inverts
  p = p' (1 + K d) - d, floors it at the answer's resolution (eps * p' * (1 + K d): below that the
  rounded answer says nothing) and renormalises, row by row. Unperturbed rows (m' ~ 0) are left as
  they are. Exact when the victim's smallest probability is 0, close when it is small; but DPreds
  answers in float32 lose every probability under ~1e-7 of the top one (logit gaps over ~16), so an
  inverter recovers at best a victim that rounds its answers that far.
- ``postprocess``: blur (Gaussian, sigma ~ U[blur]) and/or JPEG-compress (quality ~ U[jpeg]) every
  synthetic query in pixel space, to wash out the generator's upsampling artefacts the detector keys
  on. Where the attack's own tensor allows it (no autograd history) the processed image replaces it in
  place, so the clone trains on exactly what was sent.
- ``mix_real``: send real photographs (crops the detector never trained on, never the victim's data)
  alongside the synthetic queries so that the flagged share stays under rho. With assumed flag rates
  f_s (synthetic) and f_r (real) and target share t = rho - margin, each batch of n synthetic queries
  carries ceil(n (f_s - t) / (t - f_r)) photos. Photos count as queries; their answers are kept in
  the attack's memory (used after a refusal) but the base attack trains on its synthetic answers.
  The attacker estimates its flagged share from the DPreds signature (smallest probability above
  ``signature``) and reports it.
- ``rotate_ids``: a fresh client id every ``every`` queries (0: only when refused or over a quota), at
  most ``max_ids`` identities; a refused batch is re-sent under the next id. The target must implement
  ``rotate_identity()`` (the evaluation harness's target does; over HTTP it is a new header value).
- ``generator_bn_eval``: the attack's generator keeps its BatchNorm layers in eval mode (running
  statistics, never batch statistics) however the attack switches it to training: its images lack the
  batch-statistics look the detector's generator sources have (a randomly initialised generator in
  this mode was flagged on 0 of 300 queries by the MNIST detector). The generator still learns.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image, ImageFilter

from guardian_plugin.attacks.base import ATTACKS, Attack, _import_all
from guardian_plugin.attacks.common import norm_consts, proxy_images, to_input, to_pixels
from guardian_plugin.attacks.target import QueryRefused

STRATEGIES = ("invert_dpreds", "postprocess", "mix_real", "rotate_ids", "generator_bn_eval")


def invert_dpreds(probs: torch.Tensor, min_d: float = 1e-4) -> torch.Tensor:
    """Undo DPreds row by row, estimating d from the smallest probability (see module doc)."""
    k = probs.shape[1]
    m = probs.min(1, keepdim=True).values
    d = m / (1 - k * m).clamp_min(1e-6)
    # what the answer still resolves: p' is rounded to its dtype, so p is known to eps * p' * (1 + K d).
    # Below that the truth is unknown, not 0; a floor there keeps logit recovery from reading the
    # smallest class as -87 (float32's tiny) when it was merely below the answer's resolution.
    floor = torch.finfo(probs.dtype).eps * probs * (1 + k * d)
    out = torch.maximum(probs * (1 + k * d) - d, floor)
    out = out / out.sum(1, keepdim=True).clamp_min(1e-12)
    keep = (d < min_d) | (k * m >= 1 - 1e-6)  # nothing to undo, or a flat row that cannot be inverted
    return torch.where(keep, probs, out)


def _postprocess_pixels(pix: torch.Tensor, rng: np.random.RandomState, blur, jpeg, p: float) -> torch.Tensor:
    out = pix.clone()
    for i in range(pix.shape[0]):
        if rng.rand() >= p:
            continue
        arr = (pix[i].permute(1, 2, 0).cpu().numpy() * 255).round().clip(0, 255).astype(np.uint8)
        im = Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr)
        if blur:
            im = im.filter(ImageFilter.GaussianBlur(float(rng.uniform(*blur))))
        if jpeg:
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=int(rng.randint(jpeg[0], jpeg[1] + 1)))
            buf.seek(0)
            im = Image.open(buf).convert(im.mode)
        a = np.asarray(im, dtype=np.float32) / 255.0
        a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
        out[i] = torch.from_numpy(a).to(pix.device)
    return out


def _keep_bn_eval(module: torch.nn.Module) -> None:
    """Make ``module.train(...)`` leave every BatchNorm layer in eval mode."""
    bns = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    plain_train = module.train

    def train(mode: bool = True):
        plain_train(mode)
        for m in bns:
            m.eval()
        return module

    module.train = train
    module.train(module.training)


class DefenseAware:
    """Mixin placed before an attack class; configured by ``self.aware`` (strategy -> settings)."""

    aware: dict = {}

    def setup(self):
        super().setup()
        a = self.aware
        unknown = set(a) - set(STRATEGIES)
        if unknown:
            raise ValueError(f"unknown defense-aware strategies {sorted(unknown)}; known: {STRATEGIES}")
        c, h, _ = self.image_shape
        self._mean, self._std = norm_consts(self.cfg.mean, self.cfg.std, self.device)
        self._rng = np.random.RandomState(self.seed + 7)
        self.identities = 1
        self.refusals = []  # attacker-side query counts at which an identity was refused
        self._since_rotation = 0
        self.real_sent = 0
        self.looks_flagged = 0  # answers carrying the DPreds signature
        if "generator_bn_eval" in a:
            gen = getattr(self, "generator", None)
            if gen is None:
                raise ValueError(f"generator_bn_eval: the {self.name} attack has no generator")
            _keep_bn_eval(gen)
        if "mix_real" in a:
            m = a["mix_real"] or {}
            pool = proxy_images(str(m.get("proxy", "photos")), int(m.get("pool", 4000)), h, c, self.seed + 11)
            self._real_pool = to_input(pool.to(self.device), self._mean, self._std)
            rho = float(m.get("rho", 0.5))
            t = rho - float(m.get("margin", 0.1))
            f_s, f_r = float(m.get("synthetic_flag_rate", 1.0)), float(m.get("real_flag_rate", 0.1))
            if not f_r < t:
                raise ValueError("mix_real: real_flag_rate must be below rho - margin")
            self._mix_ratio = max(f_s - t, 0.0) / (t - f_r)

    # ---------------------------------------------------------------------------- strategies
    def received(self, x, probs):
        probs = super().received(x, probs)
        sig = float((self.aware.get("mix_real") or {}).get("signature", 0.02))
        self.looks_flagged += int((probs.min(1).values > sig).sum())
        if "invert_dpreds" in self.aware:
            probs = invert_dpreds(probs, float((self.aware["invert_dpreds"] or {}).get("min_d", 1e-4)))
        return probs

    def _postprocess(self, x):
        cfg = self.aware["postprocess"] or {}
        blur, jpeg = cfg.get("blur", [0.5, 1.2]), cfg.get("jpeg", [40, 90])
        pix = _postprocess_pixels(to_pixels(x.detach(), self._mean, self._std), self._rng, blur, jpeg,
                                  float(cfg.get("p", 1.0)))
        xp = to_input(pix, self._mean, self._std)
        if not x.requires_grad and x.grad_fn is None:
            x.copy_(xp)  # the attack then trains on what was actually sent
            return x
        return xp

    def _send(self, x):
        if "mix_real" not in self.aware:
            return Attack.query(self, x)
        n_r = int(math.ceil(x.shape[0] * self._mix_ratio))
        idx = torch.from_numpy(self._rng.randint(0, len(self._real_pool), n_r)).to(self.device)
        both = torch.cat([x.detach(), self._real_pool[idx]])
        answers = Attack.query(self, both)
        self.real_sent += n_r
        return answers[: x.shape[0]]

    def query(self, x):
        if "postprocess" in self.aware:
            x = self._postprocess(x)
        rot = self.aware.get("rotate_ids")
        if rot is None:
            return self._send(x)
        rot = rot or {}
        every, max_ids = int(rot.get("every", 0)), int(rot.get("max_ids", 1000))
        if every and self._since_rotation >= every and self.identities < max_ids:
            self._rotate()
        while True:
            try:
                before = self.queries
                out = self._send(x)
                self._since_rotation += self.queries - before
                return out
            except QueryRefused:
                if self.identities >= max_ids:
                    raise
                self.refusals.append(self.queries)
                self.refused, self.refused_at = False, None
                self._rotate()

    def _rotate(self):
        if not hasattr(self.target, "rotate_identity"):
            raise TypeError(f"{type(self.target).__name__} cannot rotate client ids (no rotate_identity())")
        self.target.rotate_identity()
        self.identities += 1
        self._since_rotation = 0

    def run(self):
        result = super().run()
        result.extra.update({"aware": sorted(self.aware), "identities": self.identities,
                             "identity_refusals": len(self.refusals), "real_queries": self.real_sent,
                             "answers_with_dpreds_signature": self.looks_flagged})
        return result


def build_aware_attack(name: str, aware: dict, *args, **kw) -> Attack:
    """The registered attack ``name`` with the defense-aware strategies ``aware`` applied."""
    _import_all()
    base = ATTACKS.get(name)
    cls = type(f"Aware{base.__name__}", (DefenseAware, base), {"aware": dict(aware), "name": base.name})
    return cls(*args, **kw)
