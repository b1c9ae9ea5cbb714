"""The per-client distribution test: does a client's recent traffic, as a set, look like benign traffic?

The per-sample detector judges one image at a time; an attacker whose images each look real enough
(a generator kept in BatchNorm eval mode, proxy-data attacks) passes it. As a set, such traffic still
differs from benign traffic in what the served model and the detector make of it. Each answered query
falls into one of ``B`` joint bins of two features:

- the victim's confidence, ``-log(1 - max_k p_k)``: benign inputs of the task are mostly answered with
  near-certainty; synthetic ones and off-task images are not;
- the detector's margin, ``max_j (score_j - threshold_j)``: how close to being flagged the query came.

The bin edges are quantiles of these features on a benign reference set (the detector's calibration
split, never its evaluation split), and the reference probabilities ``q`` of the bins are estimated on
it, stored with the artifact as ``reference.json``. The ledger keeps each client's bin counts in blocks
of at least ``block`` queries (guardian_plugin.ledger.base.dist_push); the last complete block, with
``n`` queries and empirical distribution ``p``, fails the test when

    KL(p || q)  >=  t(n) = ( ln C(n + B - 1, B - 1) + ln(1 / alpha) ) / n

By the method of types (Csiszar), for n queries drawn independently from ``q`` there are at most
C(n + B - 1, B - 1) empirical distributions, each with probability at most exp(-n KL(p || q)), so
P(KL >= t(n)) <= alpha. A benign client's 10,000 queries make at most 10,000 / block complete blocks;
with alpha = 1e-6 * block / 10,000 per block the union bound keeps its chance of ever failing below
1e-6 (:func:`block_alpha`). The bound assumes that the benign client's queries follow the reference
distribution; a client with a different kind of real images (another camera, another task) is not
covered and can fail: docs/refusal-rule.md says what was measured.

A failing client is treated as flagged (guardian_plugin.guardian): its answers get the response
policy and its queries count as flagged for the refusal rule, until a later block passes.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, replace
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from guardian_plugin.errors import ArtifactError

REFERENCE_FILE = "reference.json"
CONF_QUANTILES = (0.02, 0.1, 0.4)   # -> 4 confidence bins
MARGIN_QUANTILES = (0.5, 0.98)      # -> 3 margin bins
CONF_CAP = 1e-7                     # 1 - p_max is floored here: float32 answers do not resolve less


def confidence(probs: torch.Tensor) -> torch.Tensor:
    """``-log(1 - max_k p_k)`` per row (float64, capped at ``-log(CONF_CAP)``)."""
    top = probs.detach().double().max(-1).values
    return -torch.log((1.0 - top).clamp_min(CONF_CAP))


def margin(scores: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """``max_j (score_j - threshold_j)`` per row: > 0 when the detector flags the row."""
    return (scores.detach().double() - thresholds.to(scores.device).double()).max(-1).values


@dataclass
class Reference:
    """Bin edges and the benign bin probabilities (row-major: confidence bin x margin bin)."""

    conf_edges: List[float]
    margin_edges: List[float]
    probs: List[float]
    n: int                       # reference queries the probabilities were estimated on
    source: str = ""             # what the reference set was
    meta: dict = field(default_factory=dict)
    # the served model's input sizes [H, W] the features were measured at: None for a reference built at
    # the detector's own size (the training pipeline, `guardian reference`); `guardian protect --calibrate`
    # records the sizes the archive's own preprocess gave its calibration images (e.g. [[224, 224]])
    input_sizes: Optional[List[List[int]]] = None

    @property
    def bins(self) -> int:
        return len(self.probs)

    def describes(self, height: int, width: int, native: int) -> bool:
        """Whether the features were measured on served inputs of ``height`` x ``width`` (``native``:
        the detector's size, what a reference without ``input_sizes`` describes)."""
        sizes = self.input_sizes or [[native, native]]
        return [int(height), int(width)] in [[int(h), int(w)] for h, w in sizes]

    def bin_of(self, probs: torch.Tensor, scores: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
        """The joint bin index of each row (long, on the CPU)."""
        if getattr(self, "_edges", None) is None:  # once per reference: bin_of runs on every request
            self._edges = (torch.tensor(self.conf_edges, dtype=torch.float64),
                           torch.tensor(self.margin_edges, dtype=torch.float64))
        c = torch.bucketize(confidence(probs).cpu(), self._edges[0], right=True)
        m = torch.bucketize(margin(scores, thresholds).cpu(), self._edges[1], right=True)
        return c * (len(self.margin_edges) + 1) + m

    def counts(self, bins: torch.Tensor) -> List[int]:
        # sized by the edges, not by ``probs``: build_reference counts before ``probs`` exists, and a
        # reference whose last bins were empty (few calibration images) was written short, then refused
        # at load ("do not match the edges")
        return torch.bincount(bins, minlength=(len(self.conf_edges) + 1) * (len(self.margin_edges) + 1)).tolist()

    def save(self, directory: str) -> str:
        path = os.path.join(directory, REFERENCE_FILE)
        with open(path, "w") as f:
            json.dump(asdict(self), f, indent=1)
        return path


def build_reference(probs: torch.Tensor, scores: torch.Tensor, thresholds: torch.Tensor, source: str = "",
                    conf_quantiles: Sequence[float] = CONF_QUANTILES,
                    margin_quantiles: Sequence[float] = MARGIN_QUANTILES,
                    input_sizes: Optional[List[List[int]]] = None) -> Reference:
    """A reference from the victim's probabilities and the detector's scores on benign images. Edges
    that coincide (ties, e.g. confidences at the float32 cap) are merged; bin probabilities are the
    reference shares with one pseudo-count per bin, so no bin has probability 0. ``input_sizes``: the
    served input sizes the features were measured at, when not the detector's own (Reference)."""
    c = confidence(probs).cpu().numpy()
    m = margin(scores, thresholds).cpu().numpy()
    ce = sorted(set(np.quantile(c, conf_quantiles).round(6).tolist()))
    me = sorted(set(np.quantile(m, margin_quantiles).round(6).tolist()))
    ref = Reference(ce, me, [], int(len(c)), source, input_sizes=input_sizes)
    counts = np.asarray(ref.counts(ref.bin_of(probs, scores, thresholds)), dtype=float)
    ref.probs = ((counts + 1.0) / (counts.sum() + len(counts))).tolist()
    return ref


def load_reference(directory: str) -> Optional[Reference]:
    """The artifact's reference, or None when it has none."""
    path = os.path.join(directory, REFERENCE_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            raw = json.load(f)
        ref = Reference(**raw)
    except (OSError, ValueError, TypeError) as e:
        raise ArtifactError(f"{path}: not a distribution-test reference ({e})") from None
    if ref.bins != (len(ref.conf_edges) + 1) * (len(ref.margin_edges) + 1) or abs(sum(ref.probs) - 1) > 1e-6:
        raise ArtifactError(f"{path}: bin probabilities do not match the edges or do not sum to 1")
    sizes = ref.input_sizes
    if sizes is not None and not (isinstance(sizes, list) and sizes and all(
            isinstance(v, list) and len(v) == 2 and all(isinstance(n, int) and n > 0 for n in v) for v in sizes)):
        raise ArtifactError(f"{path}: input_sizes must be a non-empty list of [height, width] pairs, got {sizes!r}")
    return ref


def block_alpha(max_false: float = 1e-6, horizon: int = 10_000, block: int = 200) -> float:
    """Per-block false-failure level so that over ``horizon`` benign queries (at most horizon / block
    complete blocks) the union bound is ``max_false``."""
    return max_false / max(1, horizon // block)


def kl_threshold(n: int, bins: int, alpha: float) -> float:
    """``t(n)``: P(KL(p_hat || q) >= t(n)) <= alpha for n i.i.d. draws from q over ``bins`` bins."""
    log_types = math.lgamma(n + bins) - math.lgamma(bins) - math.lgamma(n + 1)
    return (log_types + math.log(1.0 / alpha)) / n


def kl(counts: Sequence[int], q: Sequence[float]) -> float:
    c = np.asarray(counts, dtype=float)
    p = c / c.sum()
    nz = p > 0
    return float((p[nz] * np.log(p[nz] / np.asarray(q, dtype=float)[nz])).sum())


@dataclass(frozen=True)
class DistributionTest:
    """The test over a reference, at every served input size: a served input of another size than the
    reference's is scored by the detector through its input mapping (``Detector.to_pixels``: a 29 px
    MNIST digit is center-cropped to the detector's 28 px, as for per-sample detection), and the
    victim's confidence is what the model answered at that size. Measured on the MNIST example
    (benchmarks/distribution_sizes.py, docs/refusal-rule.md): the held-out digits padded (centred) to
    29-31 px give block KLs of 0.03-0.10 (0.03-0.07 at 28 px), a BatchNorm-eval generator 4.18-4.32 at
    every size and padding.

    What the test cannot do is compare a served path that resamples every image to one size with a
    reference measured at another: TorchServe's image_classifier (Resize 256 + CenterCrop 224) in front
    of a 32 px CIFAR-10 detector whose reference was built at 32 px fails benign test images on every
    block (KL 0.55-0.73 against t = 0.29, measured). Adapters that probe the served path at load
    (the TorchServe worker: guardian_plugin.fit.verify_handler_fit) call :meth:`for_served_path`:
    ``auto`` (``enabled: auto``) then switches the test off for that deployment, with ``off`` saying why;
    ``guardian protect --calibrate DIR`` builds the reference on the served path instead, which
    describes it. Where the path was not probed (the BentoML adapter), ``auto`` decides per batch
    (:meth:`applies_to`): sizes the reference was measured at, and larger inputs the detector
    center-crops from a reference at its own size (its pixels at their own scale, as MNIST's 29-31 px),
    are tested; inputs the detector must resample are not. ``enabled: true`` applies the test anyway."""

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
        """(fails, KL, threshold) for a client's last complete block (never fails without one)."""
        if not counts or sum(counts) == 0:
            return False, 0.0, float("inf")
        n = int(sum(counts))
        t = kl_threshold(n, self.reference.bins, self.alpha)
        d = kl(counts, self.reference.probs)
        return d >= t, d, t

    def fails(self, counts: Optional[Sequence[int]]) -> bool:
        return self.evaluate(counts)[0]
