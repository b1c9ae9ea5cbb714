"""The evaluation harness: every attack against every defense configuration, measured.

Configurations (the paper's Table I / V / VII rows):
  no_defense      the victim's probabilities as they are
  dpreds_only     DPreds(d) on EVERY answer, no detector (Table V, "w/o DFMS-Detector")
  detector_only   detector + ledger refusal, answers unchanged (responses.Passthrough; "w/o DPreds")
  model_guardian  detector + ledger refusal + DPreds on flagged rows (the full method)
  raw_detector    Model-Guardian with a detector trained on raw images ("w/o gradient transformation")
  defense_in_depth Model-Guardian plus the sliding window, per-client quotas, new-identity probation and
                  the per-client distribution test (docs/refusal-rule.md; settings: guard.depth)
  prada           the baseline: PRADA's inter-query distance test (guardian_plugin.prada, docs/prada.md;
                  settings: guard.prada), a detected client refused from its next request, answers unchanged

Metrics, per run (attack x configuration x seed):
  CAcc     the clone's accuracy on the victim's test set, evaluated ``eval_points`` times along the run
  DAcc     share of the attack's answered queries the detector flagged (configurations with one)
  answered queries answered before the first refusal (the budget when never refused)
and per configuration: BAcc (the victim's test set sent by a benign client through the same target
and response path; a refused benign query counts as wrong) and FPR (benign test queries flagged).
Table II's per-batch detection scores windows of the no-defense query stream with each detector
offline (so refusal does not cut the stream short): DAcc@B = share flagged among B consecutive
attack queries, averaged over ``detection_samples`` windows spread along the run.

Each run is appended to ``OUT/runs.jsonl`` when it finishes (``resume`` skips finished runs);
``OUT/results.json``, ``OUT/tables.md`` and ``OUT/clone_accuracy.png`` are rebuilt from it. Writers of
OUT take ``OUT/.runs.lock`` (:func:`out_lock`), so several ``--resume`` processes may share one OUT.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from contextlib import contextmanager
from typing import Callable, List, Optional

import numpy as np
import torch
import torch.nn as nn

from guardian_plugin.attacks.base import build_attack
from guardian_plugin.attacks.target import EvalTarget, QueryRefused
from guardian_plugin.evaluation.config import EvalConfig
from guardian_plugin.responses import DPreds, Passthrough

DETECTOR_CONFIGS = ("model_guardian", "detector_only", "raw_detector", "defense_in_depth")


# ------------------------------------------------------------------------------------ loading
def load_victim(cfg: EvalConfig, device) -> nn.Module:
    from guardian_plugin.nets import build_classifier

    v = cfg.victim
    if not os.path.exists(v.weights):
        raise FileNotFoundError(f"victim weights {v.weights} are missing (victim.weights in the config)")
    m = build_classifier(v.arch, in_channels=v.channels, num_classes=v.num_classes, image_size=v.size, **v.arch_params)
    m.load_state_dict(torch.load(v.weights, map_location="cpu", weights_only=True))
    return m.eval().to(device)


def load_test_set(cfg: EvalConfig):
    """The victim's test set as (normalised inputs, labels)."""
    from guardian_plugin.training.data import cifar10_split, mnist_splits, normalise, to_float

    spec = cfg.test_data
    if spec == "mnist":
        x, y = mnist_splits(seed=cfg.split_seed)["test"]
        x, y = to_float(x), torch.from_numpy(y)
    elif spec.startswith("file:"):
        d = torch.load(spec[5:], map_location="cpu", weights_only=True)
        x, y = d["x"], d["y"]
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        y = torch.as_tensor(y).long()
    elif spec.startswith("cifar10:"):  # a named split of the shared copy; a prefix of it stays stratified
        x, y = cifar10_split(spec[8:], cfg.test_limit)
        x, y = to_float(x), torch.from_numpy(y)
    else:
        raise ValueError(f"test_data {spec!r}: use mnist, cifar10:<split> or file:<path>")
    if cfg.test_limit:
        x, y = x[: cfg.test_limit], y[: cfg.test_limit]
    return normalise(x, cfg.victim.mean, cfg.victim.std), y


class Defenses:
    """Builds a fresh target per run (fresh ledger), loading each detector once."""

    def __init__(self, cfg: EvalConfig, victim: nn.Module, device):
        self.cfg, self.victim, self.device = cfg, victim, device
        self._detectors = {}
        self.tau = cfg.guard.resolve_tau()
        self._prada_delta = None

    @property
    def prada_delta(self) -> float:
        if self._prada_delta is None:
            self._prada_delta = self.cfg.guard.prada.resolve_delta()
        return self._prada_delta

    def path(self, which: str) -> Optional[str]:
        return self.cfg.guard.detector if which == "gradient" else self.cfg.guard.raw_detector

    def available(self, which: str) -> bool:
        p = self.path(which)
        return p is not None and os.path.isdir(p)

    def detector(self, which: str):
        path = self.path(which)
        if path is None:
            return None
        if path not in self._detectors:
            from guardian_plugin.detector import load_detector

            self._detectors[path] = load_detector(path, device=self.device)
        return self._detectors[path]

    def target(self, configuration: str, client_id: str, **kw) -> EvalTarget:
        from guardian_plugin.guardian import Guardian
        from guardian_plugin.ledger import RefusalRule, open_ledger

        g = self.cfg.guard
        guardian, always = None, None
        if configuration == "dpreds_only":
            always = DPreds(g.d)
        elif configuration in DETECTOR_CONFIGS:
            det = self.detector("raw" if configuration == "raw_detector" else "gradient")
            policy = Passthrough() if configuration == "detector_only" else DPreds(g.d)
            if configuration == "defense_in_depth":
                guardian = self.depth_guardian(det, policy, client_id)
            else:
                ledger = open_ledger("memory://", RefusalRule(self.tau, g.rho), f"eval-{client_id}")
                guardian = Guardian(det, ledger, policy, self.device)
        elif configuration == "prada":
            from guardian_plugin.prada import Prada, PradaGuard

            p = g.prada
            guardian = PradaGuard(Prada(self.prada_delta, p.min_distances, p.max_kept, p.check_every, self.device))
        elif configuration != "no_defense":
            raise ValueError(f"unknown configuration {configuration!r}")
        v = self.cfg.victim
        return EvalTarget(self.victim, v.num_classes, guardian, always, client_id, self.device, g.quantize,
                          v.mean, v.std, **kw)


    def depth_guardian(self, det, policy, client_id: str):
        """Model-Guardian plus the defense-in-depth mechanisms with the config's ``guard.depth`` settings
        (the shipped guard-config defaults unless the eval config overrides them)."""
        from guardian_plugin.distribution import DistributionTest, load_reference
        from guardian_plugin.guardian import Guardian
        from guardian_plugin.ledger import open_ledger

        g, dd = self.cfg.guard, self.cfg.guard.depth
        dist = None
        if dd.distribution.enabled is not False:
            ref = load_reference(self.path("gradient"))
            if ref is None and dd.distribution.enabled is True:
                raise FileNotFoundError(f"{self.path('gradient')} has no reference.json for the distribution test")
            if ref is not None:
                d = dd.distribution
                dist = DistributionTest(ref, d.block, d.max_false, d.horizon)
        rule = dd.rule(self.tau, g.rho, dist)
        ledger = open_ledger("memory://", rule, f"eval-{client_id}")
        return Guardian(det, ledger, policy, self.device, probation=dd.probation, distribution=dist)


def replay_photos(cfg: EvalConfig) -> torch.Tensor:
    """Natural photo crops (the evaluate group, never used to train or calibrate a detector) at the
    victim's size, normalised: what a client sending photos to the model sends."""
    from guardian_plugin.training.data import normalise, photo_crops, to_float

    v = cfg.victim
    x = to_float(photo_crops("evaluate", 1000, v.size, v.channels, seed=2))
    return normalise(x, v.mean, v.std)


def accuracy_fn(x: torch.Tensor, y: torch.Tensor, device) -> Callable[[nn.Module], float]:
    def evaluate(model: nn.Module) -> float:
        model.eval()
        with torch.no_grad():
            pred = torch.cat([model(x[i:i + 500].to(device)).argmax(1).cpu() for i in range(0, len(x), 500)])
        return float((pred == y).float().mean())

    return evaluate


def benign_metrics(defenses: Defenses, configuration: str, x: torch.Tensor, y: torch.Tensor, batch: int = 1) -> dict:
    """BAcc and FPR of a benign client sending the test set through the configuration's target."""
    t = defenses.target(configuration, "benign")
    correct = refused = 0
    for i in range(0, len(x), batch):
        try:
            p = t.query(x[i:i + batch])
        except QueryRefused:
            refused += len(x[i:i + batch])
            continue
        correct += int((p.argmax(1).cpu() == y[i:i + batch]).sum())
    out = {"bacc": correct / len(x), "n": len(x), "refused": refused}
    if t.guardian is not None and t.guardian.detector is not None:
        # FPR over the whole test set, scored by the detector alone (a refusal must not hide any image)
        flags = detect_offline(t.guardian.detector, x, defenses.device)
        out["fpr"] = float(flags.float().mean())
        out["flags"] = [int(v) for v in flags]
        out["fpr_answered"] = t.flagged / max(t.queries, 1)
    return out


def benign_replay(defenses: Defenses, configuration: str, x: torch.Tensor, total: int, batch: int = 1,
                  client: str = "benign-replay") -> dict:
    """One identity sending ``x`` over and over (``total`` queries, ``batch`` per request) through the
    configuration's target: when (if ever) it was refused or hit a quota, how many answers were on
    probation (and the last such query), how many got DPreds, and whether every answer's top-1 is the
    unprotected model's."""
    t = defenses.target(configuration, client)
    same = answered = 0
    stop = None
    for i in range(0, total, batch):
        idx = torch.arange(i, min(i + batch, total)) % len(x)
        xb = x[idx]
        try:
            p = t.query(xb)
        except QueryRefused as e:
            stop = {"status": e.status, "at_query": t.queries}
            break
        same += int((p.argmax(1).cpu() == t.model_probs.argmax(1).cpu()).sum())  # the model's own top-1
        answered += len(idx)
    return {"queries": total, "answered": answered, "stopped": stop, "top1_equal": same,
            "top1_equal_all": same == answered, "probation_answers": t.probation_answers,
            "last_probation_query": t.last_probation_query, "dpreds_answers": t.dpreds_answers,
            "detector_flagged": t.flagged, "suspect_answers": t.suspect_answers}


@torch.no_grad()
def detect_offline(det, x: torch.Tensor, device, batch: int = 256) -> torch.Tensor:
    flags = [det.flag(det.to_pixels(x[i:i + batch].to(device)))[0].cpu() for i in range(0, len(x), batch)]
    return torch.cat(flags) if flags else torch.zeros(0, dtype=torch.bool)


def window_rates(flags: List[torch.Tensor], size: int, rho: float) -> dict:
    """Per-sample flagged share over the first ``size`` queries of each window (full windows only)."""
    shares = [float(f[:size].float().mean()) for f in flags if len(f) >= size]
    if not shares:
        return {"dacc": None, "windows": 0}
    return {"dacc": float(np.mean(shares)), "windows": len(shares),
            "windows_over_rho": float(np.mean([s > rho for s in shares]))}


def benign_window_fpr(flags: List[int], size: int) -> Optional[float]:
    f = np.asarray(flags, dtype=float)
    n = len(f) // size
    if n == 0:
        return None
    return float(f[: n * size].reshape(n, size).mean(1).mean())


# -------------------------------------------------------------------------------------- runs
def versions() -> dict:
    import guardian_plugin

    out = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
           "guardian_plugin": guardian_plugin.__version__, "platform": platform.platform()}
    try:
        import torchvision

        out["torchvision"] = torchvision.__version__
    except ImportError:  # pragma: no cover
        pass
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                                           timeout=10).stdout.strip() or None
    except Exception:  # pragma: no cover
        out["git_commit"] = None
    return out


def run_key(r: dict) -> tuple:
    return (r["attack_id"], r["configuration"], int(r["seed"]))


def run_one(cfg: EvalConfig, spec, configuration: str, seed: int, defenses: Defenses, x_test, y_test, device,
            out_dir: str, progress: bool = True) -> dict:
    from guardian_plugin.attacks.aware import build_aware_attack
    from guardian_plugin.nets import build_classifier

    torch.manual_seed(seed)
    np.random.seed(seed)
    v = cfg.victim
    clone = build_classifier(cfg.clone.arch, in_channels=v.channels, num_classes=v.num_classes, image_size=v.size,
                             **cfg.clone.arch_params)
    record = {}
    if configuration == "no_defense":
        n = cfg.detection_samples
        win = max(cfg.detection_windows)
        starts = sorted({min(int(i * spec.budget / n), max(spec.budget - win, 0)) for i in range(n)})
        record = {"record_starts": starts, "record_len": win}
    target = defenses.target(configuration, f"{spec.id}-{seed}", **record)
    params = {"mean": v.mean, "std": v.std, "num_classes": v.num_classes, "cache_dir": cfg.cache_dir, **spec.params}
    kw = dict(budget=spec.budget, image_shape=(v.channels, v.size, v.size), device=device, seed=seed,
              evaluate=accuracy_fn(x_test, y_test, device), eval_every=max(spec.budget // cfg.eval_points, 1),
              progress=progress, **params)
    if spec.label_mode:
        kw["label_mode"] = spec.label_mode
    if spec.aware:
        attack = build_aware_attack(spec.attack, spec.aware, target, clone, **kw)
    else:
        attack = build_attack(spec.attack, target, clone, **kw)
    t0 = time.time()
    res = attack.run()
    out = {
        "attack_id": spec.id, "attack": spec.attack, "label_mode": attack.label_mode, "configuration": configuration,
        "seed": seed, "seen": bool(spec.seen), "aware": sorted(spec.aware), "budget": spec.budget,
        "queries_attack": res.queries, "queries_target": target.queries,
        "accounting_ok": res.queries == target.queries,
        "refused": target.refused_at is not None,
        "answered_before_refusal": target.refused_at if target.refused_at is not None else target.queries,
        "stopped_by": {None: None, 403: "refusal", 429: "quota"}.get(target.stop_status, str(target.stop_status)),
        "identities": target.identities,
        "cacc": res.clone_accuracy, "history": res.history, "seconds": round(time.time() - t0, 1),
        "extra": {k: v for k, v in res.extra.items() if isinstance(v, (int, float, str, bool, list))},
    }
    if target.guardian is not None and target.guardian.detector is None:  # prada: no per-sample detector
        st = target.guardian.prada.state(target.base_id)
        out["prada"] = {"detected_at_query": st.detected_at, "w_at_detection": st.w_at_detection,
                        "last_w": st.last_w, "distances": len(st.distances), "delta": target.guardian.prada.delta}
    elif target.guardian is not None:
        out["flagged"] = target.flagged
        out["dacc"] = target.flagged / max(target.queries, 1)
        out["probation_answers"] = target.probation_answers
        out["suspect_answers"] = target.suspect_answers
    if configuration == "no_defense":
        out["windows_file"] = save_windows(target.recorded_windows(), out_dir, f"{spec.id}-{seed}")
    return out


def save_windows(windows: List[torch.Tensor], out_dir: str, name: str) -> str:
    """Keep the recorded query windows (float16) so any detector can score them later."""
    d = os.path.join(out_dir, "windows")
    os.makedirs(d, exist_ok=True)
    ignore = os.path.join(d, ".gitignore")
    if not os.path.exists(ignore):
        with open(ignore, "w") as f:
            f.write("*\n")
    path = os.path.join(d, f"{name}.pt")
    torch.save([w.half() for w in windows], path)
    return os.path.relpath(path, out_dir)


def score_windows(r: dict, cfg: EvalConfig, defenses: "Defenses", out_dir: str, device) -> None:
    """Table II: score a no-defense run's recorded windows with every available detector (in place)."""
    path = os.path.join(out_dir, r.get("windows_file", ""))
    if r["configuration"] != "no_defense" or not os.path.isfile(path):
        return
    det_out = r.setdefault("detection", {})
    windows = None
    for which in ("gradient", "raw"):
        if which in det_out or not defenses.available(which):
            continue
        if windows is None:
            windows = [w.float() for w in torch.load(path, map_location="cpu", weights_only=True)]
        det = defenses.detector(which)
        flags = [detect_offline(det, w, device) for w in windows]
        det_out[which] = {str(b): window_rates(flags, b, cfg.guard.rho) for b in cfg.detection_windows}
        allf = torch.cat(flags) if flags else torch.zeros(0)
        det_out[which]["all"] = {"dacc": float(allf.float().mean()) if len(allf) else None, "n": int(len(allf))}


_WORKER: dict = {}


def _worker_init(cfg: EvalConfig, device: str) -> None:
    torch.set_num_threads(cfg.threads or 1)
    victim = load_victim(cfg, device)
    _WORKER.update(cfg=cfg, device=torch.device(device), x_y=load_test_set(cfg),
                   defenses=Defenses(cfg, victim, torch.device(device)))


def _worker_run(attack_id: str, conf: str, seed: int, out_dir: str) -> dict:
    w = _WORKER
    spec = next(a for a in w["cfg"].attacks if a.id == attack_id)
    return run_one(w["cfg"], spec, conf, seed, w["defenses"], *w["x_y"], w["device"], out_dir, False)


@contextmanager
def out_lock(out_dir: str):
    """Serialises the writers of OUT/runs.jsonl and OUT/benign.json across processes: two ``evaluate
    --resume`` runs on one OUT (say, other attacks from another shell) append and rewrite in turn, and
    each rewrite starts from what is on disk then, so neither drops the other's runs."""
    import fcntl

    with open(os.path.join(out_dir, ".runs.lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def read_runs(runs_path: str) -> dict:
    """Finished runs in OUT/runs.jsonl by (attack id, configuration, seed); {} when there is none."""
    done = {}
    if os.path.exists(runs_path):
        with open(runs_path) as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    done[run_key(r)] = r
    return done


def _run_parallel(cfg: EvalConfig, todo, jobs: int, out_dir: str, device, finished, log) -> None:
    """Runs ``todo`` in ``jobs`` spawned worker processes; ``finished`` records each as it ends (in the
    parent, so runs.jsonl has one writer)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    log(f"{len(todo)} runs in {jobs} worker processes")
    with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                             initargs=(cfg, str(device))) as pool:
        futures = {pool.submit(_worker_run, spec.id, conf, int(seed), out_dir): (i, spec, conf, seed)
                   for i, spec, conf, seed in todo}
        for fut in as_completed(futures):
            finished(*futures[fut], fut.result())


def run_evaluation(cfg: EvalConfig, out_dir: str, *, attacks: Optional[List[str]] = None,
                   configurations: Optional[List[str]] = None, seeds: Optional[List[int]] = None,
                   resume: bool = False, progress: bool = True, command: Optional[str] = None,
                   log: Callable[[str], None] = print, jobs: int = 1) -> dict:
    """Run the selected runs, append each to OUT/runs.jsonl, then write results.json, tables.md and
    the clone-accuracy plot from every finished run of this config.

    ``jobs`` > 1 runs that many runs at once in worker processes (each with ``cfg.threads`` torch
    threads, default 1); every run is seeded on its own, so its figures do not depend on ``jobs``."""
    from guardian_plugin.evaluation.report import write_report

    os.makedirs(out_dir, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    unknown = set(attacks or []) - {a.id for a in cfg.attacks}
    if unknown:
        raise ValueError(f"unknown attack ids {sorted(unknown)}; the config has {[a.id for a in cfg.attacks]}")
    specs = [a for a in cfg.attacks if attacks is None or a.id in attacks]
    runs_path = os.path.join(out_dir, "runs.jsonl")
    done = {}
    if resume:
        done = read_runs(runs_path)
    elif os.path.exists(runs_path):
        os.remove(runs_path)
    victim = load_victim(cfg, device)
    x_test, y_test = load_test_set(cfg)
    defenses = Defenses(cfg, victim, device)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    all_confs = [c for c in cfg.configurations] + [c for a in cfg.attacks for c in (a.configurations or [])]
    all_confs = list(dict.fromkeys(all_confs))
    benign_path = os.path.join(out_dir, "benign.json")
    benign = {}  # what this process measures; the rest of benign.json is merged in under the lock below
    measured = [c for c in all_confs if configurations is None or c in configurations]
    for c in measured:
        benign[c] = benign_metrics(defenses, c, x_test, y_test, cfg.benign_batch)
        log(f"benign {c}: BAcc {benign[c]['bacc']:.4f}" + (f", FPR {benign[c]['fpr']:.4f}" if "fpr" in benign[c] else ""))
    replays = {}
    if cfg.benign_replay:
        photos = replay_photos(cfg) if cfg.photo_replay else None
        for c in measured:
            replays[c] = {"digits": benign_replay(defenses, c, x_test, cfg.benign_replay, cfg.benign_batch)}
            if photos is not None:
                replays[c]["photos"] = benign_replay(defenses, c, photos, cfg.photo_replay, cfg.benign_batch,
                                                     "photo-client")
            log(f"benign replay {c}: " + "; ".join(f"{k}: answered {v['answered']}/{v['queries']}, stopped "
                                                     f"{v['stopped']}, probation {v['probation_answers']} (last "
                                                     f"{v['last_probation_query']}), DPreds {v['dpreds_answers']}, "
                                                     f"top-1 equal {v['top1_equal_all']}" for k, v in replays[c].items()))
    with out_lock(out_dir):  # another `evaluate --resume` on OUT may have written other configurations
        if resume and os.path.exists(benign_path):
            with open(benign_path) as f:
                disk = json.load(f)
            replays = {**disk.pop("_replay", {}), **replays}
            benign = {**disk, **benign}
        with open(benign_path, "w") as f:
            json.dump({**benign, "_replay": replays}, f)
    # --seeds replaces every seed list of the config (top-level and per attack)
    plan = [(s, c, seed) for s in specs for c in cfg.configurations_for(s)
            if configurations is None or c in configurations
            for seed in (seeds if seeds is not None else cfg.seeds_for(s, c))]
    todo = [(i, spec, conf, seed) for i, (spec, conf, seed) in enumerate(plan, 1)
            if (spec.id, conf, int(seed)) not in done]

    def finished(i, spec, conf, seed, r):
        done[(spec.id, conf, int(seed))] = r
        with out_lock(out_dir), open(runs_path, "a") as f:
            f.write(json.dumps(r) + "\n")
        ans = f", answered {r['answered_before_refusal']}" + (" (refused)" if r["refused"] else "")
        dacc = f", DAcc {r['dacc']:.3f}" if "dacc" in r else ""
        log(f"[{i}/{len(plan)}] {spec.id} / {conf} / seed {seed}: CAcc {r['cacc']:.4f}{dacc}{ans}, "
            f"queries {r['queries_attack']} (target {r['queries_target']}), {r['seconds']} s")

    if jobs > 1 and len(todo) > 1:
        _run_parallel(cfg, todo, jobs, out_dir, device, finished, log)
    else:
        for i, spec, conf, seed in todo:
            finished(i, spec, conf, seed, run_one(cfg, spec, conf, seed, defenses, x_test, y_test, device, out_dir, progress))
    with out_lock(out_dir):
        # runs another process appended to OUT meanwhile are kept, in the file and in the report
        for k, r in read_runs(runs_path).items():
            done.setdefault(k, r)
        changed = False
        for r in done.values():
            before = json.dumps(r.get("detection"), sort_keys=True)
            score_windows(r, cfg, defenses, out_dir, device)
            changed |= json.dumps(r.get("detection"), sort_keys=True) != before
        if changed:  # keep runs.jsonl the single source of every finished run
            tmp = runs_path + ".tmp"
            with open(tmp, "w") as f:
                for r in done.values():
                    f.write(json.dumps(r) + "\n")
            os.replace(tmp, runs_path)
    runs = sorted((r for r in done.values() if r["attack_id"] in {a.id for a in cfg.attacks}),
                  key=lambda r: (r["attack_id"], r["configuration"], r["seed"]))
    results = {
        "meta": {"name": cfg.name, "command": command or " ".join(sys.argv),
                 "seeds": sorted({int(r["seed"]) for r in runs}), "started": started,
                 "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "tau": defenses.tau,
                 "threads": torch.get_num_threads(), "device": str(device), "versions": versions(),
                 "config": cfg.model_dump()},
        "benign": {c: {k: v for k, v in b.items() if k != "flags"} for c, b in benign.items()},
        "benign_replay": replays,
        "benign_windows": {c: {str(w): benign_window_fpr(b.get("flags", []), w) for w in cfg.detection_windows}
                           for c, b in benign.items() if "flags" in b},
        "runs": runs,
    }
    write_report(results, cfg, out_dir)
    return results
