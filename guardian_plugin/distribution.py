"""The per-client distribution test: does a client's recent traffic, as a set, sit where extraction
queries sit?

The per-sample detector judges one image at a time; an attacker whose images each look real enough
(a generator kept in BatchNorm eval mode, DisGUIDE, Dual Students) passes it. As a set, extraction
traffic still does something benign traffic does not: data-free generators are trained to find the
inputs the clone and the victim disagree on, near the victim's decision boundaries, and the victim
answers them with little confidence. Measured on the MNIST and CIFAR-10 examples
(benchmarks/distribution_candidates.py, docs/refusal-rule.md): every query of the seven attacks and of
the defense-aware variants falls below the 2% quantile of the victim's confidence on real images.

So each answered query is scored by one event, *uncertain*: the victim's confidence
``-log(1 - max_k p_k)`` is below ``conf_edge`` (a low quantile of the confidences on a benign reference
set: the detector's calibration split, never its evaluation split), or, when the reference sets
``margin_edge``, the detector's margin ``max_j (score_j - threshold_j)`` is above it. How often a benign
query is uncertain depends on what it shows and how it was taken: a cat is less certain than a truck, a
blurred or up-scaled photo less than a sharp one. The reference therefore keeps:

- **one rate per class group** (the victim's predicted class; classes with few reference images are
  pooled into one group), so that a client is compared with the mixture that matches its own class mix
  (a client that sends only cats is compared with cats);
- **a declared benign envelope**: the rate of each group is the largest over the reference images as
  they are and under each nuisance the defender accepts (``NUISANCES``: JPEG, down-and-up sampling,
  blur, sensor noise, small rotations, translations and zooms), with an upper confidence bound.

The ledger keeps each client's counts per (group, uncertain or not) in blocks of ``block`` distinct
queries (identical queries count once: guardian_plugin.guardian; a cached answer tells an attacker
nothing new). The last complete block, with ``n`` queries of which ``k`` uncertain, and the envelope's
rate ``s`` of the mixture of groups that block holds, fails when

    k / n > s  and  n * KL(k / n || s) >= ln(1 / alpha)          (Bernoulli KL)

By the Chernoff-Hoeffding bound, for a client whose queries are independent and uncertain with
probability at most the envelope's rate of their group, P(fail) <= alpha. A benign client's 10,000
queries make at most 10,000 / block complete blocks; with alpha = 1e-6 * block / 10,000 per block the
union bound keeps its chance of ever failing below 1e-6 (:func:`block_alpha`). The bound covers the
declared envelope; docs/refusal-rule.md says what was measured outside it (the benign-traffic suite).

A failing client is treated as flagged (guardian_plugin.guardian): its answers get the response
policy and its queries count as flagged for the refusal rule, until a later block passes.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from guardian_plugin.errors import ArtifactError

REFERENCE_FILE = "reference.json"
FORMAT = 2
CONF_QUANTILE = 0.02        # uncertain: the victim less confident than on 98% of the reference images
MARGIN_QUANTILE = None      # (optional) or the detector's margin above this quantile of the reference
MIN_GROUP = 50              # reference images a predicted class needs for a group of its own
UPPER = 0.95                # one-sided confidence level of each group's rate (Clopper-Pearson upper bound)
CONF_CAP = 1e-7             # 1 - p_max is floored here: float32 answers do not resolve less


def confidence(probs: torch.Tensor) -> torch.Tensor:
    """``-log(1 - max_k p_k)`` per row (float64, capped at ``-log(CONF_CAP)``)."""
    top = probs.detach().double().max(-1).values
    return -torch.log((1.0 - top).clamp_min(CONF_CAP))


def margin(scores: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """``max_j (score_j - threshold_j)`` per row: > 0 when the detector flags the row."""
    return (scores.detach().double() - thresholds.to(scores.device).double()).max(-1).values


@dataclass
class Reference:
    """What the test compares a client with: the uncertain event's edges, the class -> group map and each
    group's envelope rate (module docstring)."""

    conf_edge: float
    groups: List[int]            # predicted class -> group
    rates: List[float]           # per group: the envelope's upper rate of uncertain queries
    n: int                       # reference images (as they are) the rates were estimated on
    margin_edge: Optional[float] = None
    source: str = ""             # what the reference set was
    envelope: List[str] = field(default_factory=list)   # the nuisances the rates cover (NUISANCES specs)
    meta: dict = field(default_factory=dict)            # per-nuisance rates, quantiles: for reports
    # the served model's input sizes [H, W] the features were measured at: None for a reference built at
    # the detector's own size (the training pipeline, `guardian reference`); `guardian protect --calibrate`
    # records the sizes the archive's own preprocess gave its calibration images (e.g. [[224, 224]])
    input_sizes: Optional[List[List[int]]] = None
    format: int = FORMAT

    @property
    def bins(self) -> int:
        """Counts the ledger keeps per block: (group, uncertain or not)."""
        return 2 * len(self.rates)

    def describes(self, height: int, width: int, native: int) -> bool:
        """Whether the features were measured on served inputs of ``height`` x ``width`` (``native``:
        the detector's size, what a reference without ``input_sizes`` describes)."""
        sizes = self.input_sizes or [[native, native]]
        return [int(height), int(width)] in [[int(h), int(w)] for h, w in sizes]

    def uncertain(self, probs: torch.Tensor, scores: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
        """Whether each row is uncertain (bool, on the CPU)."""
        u = confidence(probs).cpu() < self.conf_edge
        if self.margin_edge is not None:
            u |= margin(scores, thresholds).cpu() > self.margin_edge
        return u

    def bin_of(self, probs: torch.Tensor, scores: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
        """Each row's bin, ``2 * group + uncertain`` (long, on the CPU)."""
        if getattr(self, "_groups", None) is None:  # once per reference: bin_of runs on every request
            self._groups = torch.tensor(self.groups, dtype=torch.long)
        cls = probs.detach().argmax(-1).cpu().clamp_(0, len(self.groups) - 1)
        return 2 * self._groups[cls] + self.uncertain(probs, scores, thresholds).long()

    def counts(self, bins: torch.Tensor) -> List[int]:
        return torch.bincount(bins, minlength=self.bins).tolist()

    def expected(self, counts: Sequence[int]) -> float:
        """The envelope's uncertain rate for a block with these counts: its groups' rates, mixed as the
        block's own queries are."""
        c = np.asarray(counts, dtype=float).reshape(-1, 2).sum(1)
        return float((c * np.asarray(self.rates)).sum() / max(c.sum(), 1.0))

    def save(self, directory: str) -> str:
        path = os.path.join(directory, REFERENCE_FILE)
        with open(path, "w") as f:
            f.write(self.to_json())
        return path

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1) + "\n"


def upper_rate(k: int, n: int, level: float = UPPER) -> float:
    """One-sided Clopper-Pearson upper bound of a rate seen ``k`` times in ``n``."""
    from scipy.stats import beta

    if n <= 0:
        return 1.0
    return 1.0 if k >= n else float(beta.ppf(level, k + 1, n - k))


def build_reference(probs: torch.Tensor, scores: torch.Tensor, thresholds: torch.Tensor, source: str = "",
                    envelope: Optional[Dict[str, tuple]] = None,
                    input_sizes: Optional[List[List[int]]] = None, conf_quantile: float = CONF_QUANTILE,
                    margin_quantile: Optional[float] = MARGIN_QUANTILE, min_group: int = MIN_GROUP) -> Reference:
    """A reference from the victim's probabilities and the detector's scores on benign reference images
    (``probs``, ``scores``), and on the same images under each declared nuisance (``envelope``: spec ->
    (probs, scores) of every reference image, or (probs, scores, rows) of the reference rows ``rows``;
    guardian_plugin.nuisance). Groups: the predicted classes (on the images as they
    are) with at least ``min_group`` images; the others are pooled into one group. Each group's rate is
    the largest upper bound (:func:`upper_rate`) over the images as they are and each nuisance, with the
    images grouped by their predicted class as they are (what the client's class mix is measured by)."""
    c = confidence(probs).cpu().numpy()
    num_classes = int(probs.shape[-1])
    conf_edge = round(float(np.quantile(c, conf_quantile)), 6)
    m_edge = None if margin_quantile is None else round(float(np.quantile(margin(scores, thresholds).cpu().numpy(), margin_quantile)), 6)
    pred = probs.argmax(-1).cpu().numpy()
    per_class = np.bincount(pred, minlength=num_classes)
    big = [k for k in range(num_classes) if per_class[k] >= min_group]
    groups = [0] * num_classes
    for g, k in enumerate(big):
        groups[k] = g
    rest = [k for k in range(num_classes) if k not in big]
    for k in rest:  # the small classes: one pooled group
        groups[k] = len(big)
    ngroups = len(big) + (1 if rest else 0)
    ref = Reference(conf_edge, groups, [0.0] * ngroups, int(len(c)), m_edge, source, sorted(envelope or {}),
                    {"conf_quantile": conf_quantile, "margin_quantile": margin_quantile, "upper_level": UPPER,
                     "min_group": min_group}, input_sizes)
    gid = np.asarray(groups)[pred]
    sets = {"as_is": (probs, scores), **(envelope or {})}
    by_set = {}
    for name, (p, s, *rows) in sets.items():
        g_of = gid if not rows else gid[np.asarray(rows[0], dtype=np.int64)]
        if p.shape[0] != len(g_of):
            raise ValueError(f"envelope {name!r}: {p.shape[0]} rows for {len(g_of)} reference images")
        u = ref.uncertain(p, s, thresholds).numpy()
        by_set[name] = {"images": int(len(u)), "rate": round(float(u.mean()), 4),
                        "upper_by_group": [round(upper_rate(int(u[g_of == g].sum()), int((g_of == g).sum())), 4)
                                           for g in range(ngroups)]}
    ref.rates = [max(v["upper_by_group"][g] for v in by_set.values()) for g in range(ngroups)]
    ref.meta["rates_by_set"] = by_set
    ref.meta["group_sizes"] = [int((gid == g).sum()) for g in range(ngroups)]
    return ref


def load_reference(directory: str) -> Optional[Reference]:
    """The artifact's reference, or None when it has none."""
    path = os.path.join(directory, REFERENCE_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            raw = json.load(f)
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path}: not a distribution-test reference ({e})") from None
    if isinstance(raw, dict) and raw.get("format", 1) != FORMAT:
        raise ArtifactError(
            f"{path}: a format-{raw.get('format', 1)} reference (the earlier two-sided KL test over 12 bins); this "
            f"version reads format {FORMAT}. Rebuild it: guardian reference --config TRAIN_CONFIG --detector "
            f"{directory} (or guardian protect --calibrate DIR for an archive), docs/refusal-rule.md")
    try:
        ref = Reference(**raw)
    except TypeError as e:
        raise ArtifactError(f"{path}: not a distribution-test reference ({e})") from None
    if not ref.rates or len(ref.groups) == 0 or any(not 0 <= g < len(ref.rates) for g in ref.groups) \
            or any(not 0.0 < r <= 1.0 for r in ref.rates):
        raise ArtifactError(f"{path}: groups must index rates, and every rate must lie in (0, 1]")
    sizes = ref.input_sizes
    if sizes is not None and not (isinstance(sizes, list) and sizes and all(
            isinstance(v, list) and len(v) == 2 and all(isinstance(n, int) and n > 0 for n in v) for v in sizes)):
        raise ArtifactError(f"{path}: input_sizes must be a non-empty list of [height, width] pairs, got {sizes!r}")
    return ref


def block_alpha(max_false: float = 1e-6, horizon: int = 10_000, block: int = 200) -> float:
    """Per-block false-failure level so that over ``horizon`` benign queries (at most horizon / block
    complete blocks) the union bound is ``max_false``."""
    return max_false / max(1, horizon // block)


def bernoulli_kl(a: float, s: float) -> float:
    """KL(Bernoulli(a) || Bernoulli(s))."""
    s = min(max(s, 1e-12), 1 - 1e-12)
    out = 0.0
    if a > 0:
        out += a * math.log(a / s)
    if a < 1:
        out += (1 - a) * math.log((1 - a) / (1 - s))
    return out


@dataclass(frozen=True)
class DistributionTest:
    """The test over a reference, at every served input size: a served input of another size than the
    reference's is scored by the detector through its input mapping (``Detector.to_pixels``: a 29 px
    MNIST digit is center-cropped to the detector's 28 px, as for per-sample detection), and the
    victim's confidence is what the model answered at that size.

    What the test cannot do is compare a served path that resamples every image to one size with a
    reference measured at another: the victim's confidence and the detector's scores both move. Adapters
    that probe the served path at load (the TorchServe worker: guardian_plugin.fit.verify_handler_fit)
    call :meth:`for_served_path`: ``auto`` (``enabled: auto``) then switches the test off for that
    deployment, with ``off`` saying why; ``guardian protect --calibrate DIR`` builds the reference on the
    served path instead, which describes it. Where the path was not probed (the BentoML adapter),
    ``auto`` decides per batch (:meth:`applies_to`). ``enabled: true`` applies the test anyway."""

    reference: Reference
    block: int = 200
    max_false: float = 1e-6
    horizon: int = 10_000
    auto: bool = False
    off: str = ""  # non-empty: not applied on this deployment's served path, and why
    probed: bool = False  # for_served_path was called: the decision is per deployment, not per batch

    def for_served_path(self, height: int, width: int, native: int) -> "DistributionTest":
        """This test for a served path that gives the model ``height`` x ``width`` inputs for an image of
        the detector's size ``native`` (probed): off, with the reason, when ``auto`` and the reference
        was measured at another size; otherwise on at every input size (the mismatch, if any, is in
        ``mismatch``)."""
        reason = self.mismatch(height, width, native)
        return replace(self, probed=True, off=reason if reason and self.auto else "")

    def applies_to(self, height: int, width: int, native: int, fit: str) -> bool:
        """Whether a batch of ``height`` x ``width`` served inputs is tested (see the class docstring;
        ``native``: the detector's size, ``fit``: its input mapping's)."""
        if self.off:
            return False
        if not self.auto or self.probed or self.reference.describes(height, width, native):
            return True
        return self.reference.input_sizes is None and fit == "center_crop" and min(height, width) >= native

    def mismatch(self, height: int, width: int, native: int) -> str:
        """Why the reference does not describe a served path giving ``height`` x ``width`` inputs ('' if it does)."""
        if self.reference.describes(height, width, native):
            return ""
        sizes = ", ".join("x".join(map(str, s)) for s in (self.reference.input_sizes or [[native, native]]))
        return (f"the served path gives the model {height}x{width} inputs for a {native} px image, and the "
                f"distribution reference was measured on {sizes} inputs (guardian protect --calibrate DIR builds "
                f"it on the served path; docs/refusal-rule.md)")

    @property
    def alpha(self) -> float:
        return block_alpha(self.max_false, self.horizon, self.block)

    def evaluate(self, counts: Optional[Sequence[int]]) -> Tuple[bool, float, float]:
        """(fails, statistic ``n * KL(k/n || s)`` (0 when k/n <= s), threshold ``ln(1/alpha)``) for a
        client's last complete block (never fails without one)."""
        t = math.log(1.0 / self.alpha)
        # (a block of another layout: kept by an earlier reference in a store that outlived it)
        if not counts or sum(counts) == 0 or len(counts) != self.reference.bins:
            return False, 0.0, t
        c = np.asarray(counts, dtype=float)
        n = float(c.sum())
        share = float(c[1::2].sum()) / n
        s = self.reference.expected(counts)
        stat = n * bernoulli_kl(share, s) if share > s else 0.0
        return stat >= t, stat, t

    def fails(self, counts: Optional[Sequence[int]]) -> bool:
        return self.evaluate(counts)[0]
