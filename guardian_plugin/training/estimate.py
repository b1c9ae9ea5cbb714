"""The time estimate ``guardian train-detector --check`` prints: each stage of the plan, from the stage
times a committed run recorded, scaled by the configured sizes where the cost follows one size.

Where the recorded times come from: the ``report.json`` of a detector artifact trained at the same
image size and channels: first one next to the config (``artifacts/*/report.json``: the committed
example's own), then the committed examples of this checkout (``examples/*/artifacts/*/report.json``).
Its ``timings_s`` holds each stage of that run and its ``sources.*.seconds`` the time each source took
when its cache entry was built (the run itself may have loaded it from the cache). Nothing is
estimated for a stage no such report recorded: the plan says so instead of guessing.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import guardian_plugin

CHECKOUT_EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(guardian_plugin.__file__))),
                                 "examples")


@dataclass
class StageEstimate:
    stage: str
    low_s: Optional[float]
    high_s: Optional[float]
    how: str


@dataclass
class TimeEstimate:
    reference: Optional[str]       # the report.json the times come from (None: no comparable run)
    device: Optional[str]
    stages: List[StageEstimate] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    def total(self) -> Tuple[float, float]:
        known = [s for s in self.stages if s.low_s is not None]
        return sum(s.low_s for s in known), sum(s.high_s for s in known)

    def lines(self) -> List[str]:
        if self.reference is None:
            return [f"time estimate: none ({'; '.join(self.notes)})"]
        out = [f"time estimate per stage (from {_rel(self.reference)}, a run recorded on {self.device}; "
               "scaled where shown):"]
        for s in self.stages:
            t = "?" if s.low_s is None else _dur(s.low_s) if round(s.low_s) == round(s.high_s) \
                else f"{_dur(s.low_s)}-{_dur(s.high_s)}"
            out.append(f"  {s.stage:<22} {t:>13}  {s.how}")
        lo, hi = self.total()
        unknown = [s.stage for s in self.stages if s.low_s is None]
        out.append(f"  {'total, one stage after another':<22} {(_dur(lo) if round(lo) == round(hi) else f'{_dur(lo)}-{_dur(hi)}'):>13}"
                   + (f"  (without {', '.join(unknown)})" if unknown else ""))
        out += [f"  {n}" for n in self.notes]
        return out


def _dur(s: float) -> str:
    return f"{s:.0f} s" if s < 90 else f"{s / 60:.0f} min" if s < 5400 else f"{s / 3600:.1f} h"


def _rel(path: str) -> str:
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return rel if not rel.startswith(".." + os.sep + "..") else path


def reference_reports(base_dir: str, examples_dir: str = CHECKOUT_EXAMPLES) -> List[str]:
    """Candidate reports, the config's own example first."""
    def key(p):  # the artifact called `detector` (the example's shipped one) before variants such as detector-raw
        d = os.path.basename(os.path.dirname(p))
        return os.path.dirname(os.path.dirname(p)), d != "detector", d

    own = sorted(glob.glob(os.path.join(base_dir, "artifacts", "*", "report.json")), key=key)
    rest = sorted(glob.glob(os.path.join(examples_dir, "*", "artifacts", "*", "report.json")), key=key)
    return own + [p for p in rest if p not in own]


def _load(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            r = json.load(f)
    except (OSError, ValueError):
        return None
    return r if isinstance(r, dict) and isinstance(r.get("timings_s"), dict) and isinstance(r.get("config"), dict) else None


def _dfme_queries(params: dict) -> int:
    return int(params.get("budget", 15_000)) * len(params.get("variants") or [{}]) * int(params.get("runs", 1))


def _ratio(new: Optional[float], old: Optional[float]) -> Optional[float]:
    return new / old if new and old else None


def estimate_times(cfg, base_dir: str, stages: List[str], cached: dict, real_counts: dict,
                   examples_dir: str = CHECKOUT_EXAMPLES) -> TimeEstimate:
    """``stages``: the plan's; ``cached``: source name -> True when its cache entry exists;
    ``real_counts``: (split, entry name) -> images (None: unknown)."""
    ref, path = None, None
    for p in reference_reports(base_dir, examples_dir):
        r = _load(p)
        if r and (r["config"].get("channels"), r["config"].get("size")) == (cfg.channels, cfg.size):
            ref, path = r, p
            break
    if ref is None:
        return TimeEstimate(None, None, notes=[f"no committed detector run at {cfg.channels} x {cfg.size} x "
                                               f"{cfg.size} to take times from (looked for report.json under "
                                               f"{_rel(os.path.join(base_dir, 'artifacts'))} and {_rel(examples_dir)})"])
    rc, t = ref["config"], dict(ref["timings_s"])
    try:  # timings.json beside it also has the stage written after report.json (artifact)
        with open(os.path.join(os.path.dirname(path), "timings.json")) as f:
            t = {**json.load(f).get("timings_s", {}), **t}
    except (OSError, ValueError, AttributeError):
        pass
    est = TimeEstimate(path, ref.get("device", "?"))
    ref_sources = rc.get("sources", {})
    ref_info = ref.get("sources", {})
    ref_train = ref.get("data", {}).get("train", {})

    def recorded(stage: str, how: str = "as recorded (not scaled)") -> StageEstimate:
        v = t.get(stage)
        return StageEstimate(stage, v, v, how if v is not None else "not recorded by that run")

    for stage in stages:
        if stage.startswith("source_"):
            name = stage[len("source_"):]
            src = cfg.sources[name]
            # the reference source of the same kind (same name first)
            rname = name if ref_sources.get(name, {}).get("kind") == src.kind else next(
                (k for k, v in ref_sources.items() if v.get("kind") == src.kind), None)
            if rname is None:
                est.stages.append(StageEstimate(stage, None, None, f"that run had no {src.kind} source"))
                continue
            if cached.get(name):
                v = t.get(f"source_{rname}")
                est.stages.append(StageEstimate(stage, v, v, "cached: loading it, as recorded"))
                continue
            secs = ref_info.get(rname, {}).get("seconds")
            if secs is None:
                est.stages.append(StageEstimate(stage, None, None, "that run did not record how long it took to build"))
                continue
            p, rp = dict(src.params), dict(ref_sources[rname].get("params", {}))
            if src.kind == "dfme":
                ratios = [("queries (budget x variants x runs)", _ratio(_dfme_queries(p), _dfme_queries(rp)))]
            elif src.kind == "gan":
                ratios = [("epochs x generative images", _ratio(
                    p.get("epochs", 20) * (real_counts.get(("train", cfg.generative_data)) or 0),
                    rp.get("epochs", 20) * (ref_train.get(rc.get("generative_data")) or 0)))]
            elif src.kind == "diffusion":  # training and sampling scale differently: both bounds given
                ratios = [("training steps", _ratio(p.get("steps", 1500), rp.get("steps", 1500))),
                          ("images x sample steps", _ratio(src.n * p.get("sample_steps", 50),
                                                           ref_sources[rname].get("n", 3000) * rp.get("sample_steps", 50)))]
            else:
                ratios = [("images", _ratio(src.n, ref_sources[rname].get("n")))]
            if any(r is None for _, r in ratios):
                est.stages.append(StageEstimate(stage, None, None, "sizes not comparable with that run's"))
                continue
            rs = [r for _, r in ratios]
            how = ("built once, then cached; recorded build time" if all(abs(r - 1) < 1e-9 for r in rs) and p == rp
                   else "built once, then cached; recorded build time scaled by "
                   + (" or ".join(f"{w} (x{r:.2f})" for w, r in ratios)))
            est.stages.append(StageEstimate(stage, secs * min(rs), secs * max(rs), how))
        elif stage.startswith(("trunk_", "subdetector_")):
            d, rd = cfg.detector, rc.get("detector", {})
            ref_nets = [k for k in t if k.startswith(("trunk_", "subdetector_"))]
            if not ref_nets:
                est.stages.append(StageEstimate(stage, None, None, "that run recorded no detector training"))
                continue
            per_net = sum(t[k] for k in ref_nets) / len(ref_nets)
            synth = sum(s.n for s in cfg.sources.values()) * (1 - cfg.test_fraction - cfg.val_fraction)
            real = sum(n or 0 for (split, _), n in real_counts.items() if split == "train")
            ref_synth = sum(v.get("train", 0) for v in ref_info.values())
            ref_real = sum(ref_train.values())
            # per network: one sub-detector sees its source's images and the real ones; a shared trunk all of them
            ref_imgs = ref_real + (ref_synth if rd.get("shared_trunk") else ref_synth / max(1, len(ref_info)))
            imgs = real + (synth if d.shared_trunk else synth / max(1, len(cfg.sources)))
            r = _ratio(d.epochs * imgs, rd.get("epochs", 15) * ref_imgs)
            diff = [k for k in ("arch", "arch_params", "transform", "patch", "shared_trunk", "precompute")
                    if _norm(getattr(d, k)) != _norm(rd.get(k, getattr(type(d)(), k)))]
            how = (f"that run's mean per network, scaled by epochs x training images (x{r:.2f})" if r is not None
                   else "sizes not comparable with that run's")
            if diff:
                how += f"; that run's detector differs in {', '.join(diff)} (cost per image not scaled)"
            est.stages.append(StageEstimate(stage, per_net * r if r else None, per_net * r if r else None, how))
        else:
            est.stages.append(recorded(stage))
    timing = os.path.join(os.path.dirname(os.path.dirname(path)), "pipeline-timing.json")
    if os.path.exists(timing):
        try:
            with open(timing) as f:
                pt = json.load(f)
            est.notes.append(f"the whole example build measured {_dur(pt['total_s'])} wall on {pt.get('cpu_count', '?')} "
                             f"CPU cores with {pt.get('jobs', 1)} source processes in parallel ({_rel(timing)}: "
                             + ", ".join(f"{k} {_dur(v)}" for k, v in pt.get("stages_s", {}).items()) + ")")
        except (OSError, ValueError, KeyError, TypeError):
            pass
    est.notes.append("times are of that machine (cores, GPU or not) and that run's cache; a GPU or more cores "
                     "shortens the sources and the detector most")
    return est


def _norm(v):
    if hasattr(v, "model_dump"):
        v = v.model_dump()
    return json.dumps(v, sort_keys=True, default=str)
