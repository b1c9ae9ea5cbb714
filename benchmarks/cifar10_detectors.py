"""The CIFAR-10 detector report (issue #11): transformation models / backbones compared, the default
chosen on validation, and generalisation measured three ways, for any number of trained artifacts.

    python benchmarks/cifar10_detectors.py families                 # fill the held-out family cache (once)
    python benchmarks/cifar10_detectors.py report --detectors raw=DIR grad=DIR ... [--attack-runs DIR]

``report`` writes benchmarks/results/cifar10/detectors.{json,md}. For every artifact (trained by
``guardian train-detector`` on examples/cifar10/detector-config.yaml, sources from its cache):

1. held-out DAcc on each training source's TEST split and FPR on held-out real images (CIFAR-10 test,
   the evaluate photo crops, natural photos that are not CIFAR-10) at the artifact's calibrated thresholds;
2. leave-one-source-out: the sub-detector of one source is dropped, the thresholds of the other two are
   recalibrated on the calibration split (the pipeline's own rule, same target FPR), and the ensemble is
   measured on the dropped source. The sub-detectors are trained one per source on that source alone,
   so dropping one is the same as never having trained on it (the transform never sees a source);
3. generator families in no training source (guardian_plugin/evaluation/families.py) and the training
   sources' test images laundered by blur / JPEG, next to the one-statistic high-frequency rule;
4. the seven attacks' queries as the harness sent them to the undefended victim, in the first and the
   last recorded window of each run (``--attack-runs``: a ``guardian evaluate`` output directory of
   benchmarks/cifar10_attack_queries.yaml).

The default transform is chosen on VALIDATION figures only: the mean leave-one-source-out DAcc on the
sources' validation split (thresholds from the calibration split), ties broken by the validation DAcc
of the whole ensemble. Test splits, held-out families and attack queries never enter that choice.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, List

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from guardian_plugin.evaluation.families import FamilyContext, generate, hf_energy_rule, launder  # noqa: E402
from guardian_plugin.training.data import cifar10_split, denormalise, to_float, to_uint8  # noqa: E402

CONFIG = os.path.join(ROOT, "examples", "cifar10", "detector-config.yaml")
OUT = os.path.join(ROOT, "benchmarks", "results", "cifar10")
FAMILY_CACHE = os.path.join(ROOT, ".cache", "cifar10", "families")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # the CIFAR victim's normalisation
# Families in no training source. Budgets are the matching sources' (examples/cifar10/detector-config.yaml:
# GAN 20 epochs at width 32, DDPM 1,500 steps at width 16), so an unseen family is no less trained.
FAMILIES = {
    "random_bn_train": {}, "random_bn_eval": {},
    "vae": {"epochs": 20, "width": 32},
    "gan_transposed": {"epochs": 20, "width": 32}, "gan_bilinear": {"epochs": 20, "width": 32},
    "ddim_few_steps": {"steps": 1500, "width": 16},
    "laundered:gan_bilinear": {"epochs": 20, "width": 32}, "laundered:vae": {"epochs": 20, "width": 32},
}


def family_images(name: str, n: int, seed: int = 0, progress: bool = True) -> np.ndarray:
    """``n`` uint8 images of a held-out family (JPEG q75 round trip like the real images), cached."""
    params = FAMILIES[name]
    path = os.path.join(FAMILY_CACHE, f"{name.replace(':', '_')}-n{n}-s{seed}.npz")
    if os.path.exists(path):
        return np.load(path)["x"]
    real = cifar10_split("detector_train")[0]  # the only split a family may learn from (as the sources)
    ctx = FamilyContext(to_float(real), MEAN, STD, seed=seed, cache_dir=FAMILY_CACHE, progress=progress)
    t = time.time()
    x = generate(name, ctx, n, **params)
    os.makedirs(FAMILY_CACHE, exist_ok=True)
    np.savez_compressed(path, x=x, seconds=time.time() - t)
    print(f"family {name}: {n} images in {time.time() - t:.0f} s", flush=True)
    return x


# ------------------------------------------------------------------------------ candidates
# Transformation model x sub-detector, the paper's Table VIII on CIFAR-10. Every candidate trains on the
# same cached sources, real images, epochs and precomputed-view regime (examples/cifar10/detector-config.yaml);
# only the transform (and for `effnet_head` the architecture and epochs) change.
CANDIDATES: Dict[str, dict] = {
    "raw": {"transform": "identity"},
    "victim_gradient": {"transform": "victim"},
    "discriminator": {"transform": "discriminator"},
    "npr": {"transform": "npr"},
    "effnet_gradient_64": {"transform": "effnet_gradient"},
    # the pretrained backbone: frozen ImageNet EfficientNet-Lite0 at 64 px, a trained one-hidden-layer head
    "effnet_head_64": {"transform": "identity", "arch": "effnet_lite0_head",
                       "arch_params": {"resolution": 64, "hidden": 64}, "precompute": False, "epochs": 4},
    # ablations, never candidates for the default: synthetic images WITHOUT the JPEG round trip the real
    # ones had (the report still tests on the round-tripped test splits: an attacker who sends JPEGs)
    "raw_no_jpeg": {"transform": "identity", "top": {"synthetic_jpeg": None}, "ablation": True},
    "npr_no_jpeg": {"transform": "npr", "top": {"synthetic_jpeg": None}, "ablation": True},
}


def candidate_config(name: str):
    from guardian_plugin.training.config import load_train_config

    cfg, base = load_train_config(CONFIG)
    c = dict(CANDIDATES[name])
    c.pop("ablation", None)
    for k, v in c.pop("top", {}).items():
        setattr(cfg, k, v)
    d = cfg.detector
    d.transform = c.pop("transform")
    d.per_source_transform = {}
    for k, v in c.items():
        setattr(d, k, v)
    return cfg, base


def cmd_train(args) -> int:
    from guardian_plugin.training.pipeline import print_summary, train_detector

    torch.set_num_threads(args.threads)
    for name in args.candidates:
        out = os.path.join(args.runs, name)
        if args.resume and os.path.exists(os.path.join(out, "report.json")):
            print(f"{name}: {out} exists (--resume)")
            continue
        cfg, base = candidate_config(name)
        print(f"== candidate {name}: transform {cfg.detector.transform}, arch {cfg.detector.arch}", flush=True)
        report = train_detector(cfg, base, out, device=args.device, progress=not args.no_progress,
                                config_path=f"{CONFIG} + candidate {name}")
        print_summary(report)
    return 0


# --------------------------------------------------------------------------------- scoring
def cached_scores(det, artifact: str, name: str, x, device):
    """(scores, seconds it took to compute them): scores of one image set, cached under
    .cache/cifar10/scores keyed by the artifact's files and a digest of the images, so a rerun (e.g.
    with attack windows added) scores only what is new and still reports the measured cost."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted(os.listdir(artifact)):
        if f.endswith((".pt", ".yaml")):
            h.update(f.encode() + open(os.path.join(artifact, f), "rb").read())
    h.update(name.encode())
    h.update(x.tobytes() if isinstance(x, np.ndarray) else x.numpy().tobytes())
    path = os.path.join(ROOT, ".cache", "cifar10", "scores", h.hexdigest()[:20])
    if os.path.exists(path + ".json"):
        return np.load(path + ".npy"), json.load(open(path + ".json"))["seconds"]
    from guardian_plugin.training.pipeline import scores_of

    t = time.time()
    s = scores_of(det, x, device=device)
    seconds = time.time() - t
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.save(path + ".npy", s)
    with open(path + ".json", "w") as f:
        json.dump({"seconds": seconds, "n": int(len(x))}, f)
    return s, seconds


def rate(s: np.ndarray, thr: np.ndarray, cols=None) -> float:
    cols = list(range(s.shape[1])) if cols is None else list(cols)
    return float((s[:, cols] >= thr[cols]).any(1).mean()) if len(s) else float("nan")


def attack_windows(run_dir: str) -> Dict[str, Dict[str, torch.Tensor]]:
    """{attack: {"early": first recorded window, "late": last}} as [0, 1] pixels, from a `guardian
    evaluate` run of benchmarks/cifar10_attack_queries.yaml (no-defense runs record their queries)."""
    res = json.load(open(os.path.join(run_dir, "results.json")))
    out = {}
    for r in res["runs"]:
        if r["configuration"] != "no_defense" or not r.get("windows_file"):
            continue
        w = torch.load(os.path.join(run_dir, r["windows_file"]), map_location="cpu", weights_only=True)
        out[r["attack_id"]] = {"early": denormalise(w[0].float(), MEAN, STD), "late": denormalise(w[-1].float(), MEAN, STD), "budget": r["budget"], "seed": r["seed"],
                               "window": int(len(w[0])), "cacc": r.get("cacc")}
    return out


def evaluate_artifact(path: str, data: dict, device) -> dict:
    """Every figure of one artifact (see the module docstring)."""
    from guardian_plugin.detector import load_detector
    from guardian_plugin.training.pipeline import calibrate

    det = load_detector(path, device).eval()
    rep = json.load(open(os.path.join(path, "report.json")))
    names = list(det.names)
    thr = det.thresholds.cpu().numpy()
    seconds, n_images = 0.0, 0
    sc = {}
    for group, sets in data["sets"].items():
        sc[group] = {}
        for k, x in sets.items():
            sc[group][k], sec = cached_scores(det, path, f"{group}/{k}", x, device)
            seconds, n_images = seconds + sec, n_images + len(x)
    seconds_per_image = seconds / max(n_images, 1)
    out = {"artifact": os.path.relpath(path, ROOT), "transforms": rep["transforms"],
           "arch": rep["config"]["detector"]["arch"], "arch_params": rep["config"]["detector"]["arch_params"],
           "thresholds": dict(zip(names, map(float, thr))), "target_fpr": rep["target_fpr"],
           "train_seconds": rep["timings_s"], "ms_per_image_scoring": 1000 * seconds_per_image,
           "detector_seed": rep.get("detector_seed"), "seed": rep.get("seed")}
    out["fpr"] = {g: rate(s, thr) for g, s in sc["real"].items()}
    out["n"] = {g: int(len(s)) for g, s in sc["real"].items()}
    out["dacc_test"] = {src: rate(sc["test"][src], thr) for src in names}
    out["dacc_val"] = {src: rate(sc["val"][src], thr) for src in names}
    # leave one source out: drop its sub-detector, recalibrate the others on the calibration split
    loso = {}
    for j, src in enumerate(names):
        cols = [k for k in range(len(names)) if k != j]
        t_j, _, cal_fpr = calibrate({g: s[:, cols] for g, s in sc["calibrate"].items()}, rep["target_fpr"])
        full = thr.copy()
        full[cols] = t_j
        loso[src] = {"trained_on": [names[k] for k in cols], "dacc_val": rate(sc["val"][src], full, cols),
                     "dacc_test": rate(sc["test"][src], full, cols),
                     "fpr_cifar_test": rate(sc["real"]["cifar_test"], full, cols), "calibration_fpr": cal_fpr}
    out["loso"] = loso
    out["validation_loso_mean"] = float(np.mean([v["dacc_val"] for v in loso.values()]))
    out["validation_dacc_mean"] = float(np.mean(list(out["dacc_val"].values())))
    out["families"] = {f: {"ensemble": rate(s, thr), **{n: rate(s, thr, [k]) for k, n in enumerate(names)}}
                       for f, s in sc["families"].items()}
    out["attacks"] = {a: {"early": rate(sc["attacks"][f"{a}:early"], thr), "late": rate(sc["attacks"][f"{a}:late"], thr)}
                      for a in data["attack_info"]}
    return out


def build_data(cfg, base, attack_runs: str | None, n_family: int, families: List[str]) -> dict:
    """The images every artifact is scored on (one copy, the same for all)."""
    from guardian_plugin.training.data import natural_photos
    from guardian_plugin.training.pipeline import jpeg_images, load_real, source_splits

    sets = {"calibrate": {e.name: load_real(e, cfg, base) for e in cfg.real.calibrate}}
    real = {f"{e.name}_test" if e.name == "cifar" else f"{e.name}_evaluate": load_real(e, cfg, base)
            for e in cfg.real.evaluate}
    natural = natural_photos(cfg.size, cfg.channels)
    real["non_cifar_photos"] = np.concatenate(list(natural.values()))  # the acceptance's pooled figure
    real.update(natural)
    sets["real"] = real
    sets["val"], sets["test"], laundered = {}, {}, {}
    rep_sources = {}
    for name in cfg.sources:
        path = _cached_source(cfg, base, name)
        x = np.load(path)["x"]
        if cfg.synthetic_jpeg is not None:
            x = jpeg_images(x, cfg.synthetic_jpeg)
        _, sets["val"][name], sets["test"][name] = source_splits(x, cfg)
        laundered[f"laundered:{name} (test split)"] = to_uint8(launder(to_float(sets["test"][name]), seed=7))
        rep_sources[name] = os.path.relpath(path, ROOT)
    fam = {name: family_images(name, n_family) for name in families}
    fam.update(laundered)
    sets["families"] = fam
    info = attack_windows(attack_runs) if attack_runs else {}
    sets["attacks"] = {f"{a}:{w}": v[w] for a, v in info.items() for w in ("early", "late")}
    return {"sets": sets, "attack_info": {a: {k: v for k, v in d.items() if k not in ("early", "late")}
                                          for a, d in info.items()}, "source_cache": rep_sources}


def _cached_source(cfg, base, name: str) -> str:
    from guardian_plugin.training.pipeline import source_cache_path, victim_file_hash

    path = source_cache_path(cfg, base, name, victim_file_hash(cfg, base))
    if not os.path.exists(path):
        raise SystemExit(f"source {name!r} is not cached ({path}): run guardian train-detector --prepare-only first")
    return path


def cmd_report(args) -> int:
    from guardian_plugin.evaluation.harness import versions
    from guardian_plugin.training.common import resolve_device
    from guardian_plugin.training.config import load_train_config

    torch.set_num_threads(args.threads)
    dev = resolve_device(args.device or "cpu")
    cfg, base = load_train_config(args.config)
    data = build_data(cfg, base, args.attack_runs, args.n_family, args.families)
    rule = hf_energy_rule(data["sets"]["calibrate"]["cifar"])
    hf = {"fpr": {g: float(rule(x).mean()) for g, x in data["sets"]["real"].items()},
          "families": {f: float(rule(x).mean()) for f, x in data["sets"]["families"].items()},
          "attacks": {k: float(rule(to_uint8(x)).mean()) for k, x in data["sets"]["attacks"].items()}}
    results = {}
    for item in args.detectors:
        name, _, path = item.partition("=")
        print(f"scoring {name} ({path}) ...", flush=True)
        results[name] = evaluate_artifact(os.path.abspath(path), data, dev)
    eligible = [k for k in results if not CANDIDATES.get(k, {}).get("ablation")]
    chosen = max(eligible, key=lambda k: (round(results[k]["validation_loso_mean"], 4), results[k]["validation_dacc_mean"]))
    out = {"command": "python benchmarks/cifar10_detectors.py " + " ".join(argv_of(args)),
           "chosen_on_validation": chosen,
           "selection_rule": "max mean leave-one-source-out DAcc on the sources' validation split, then max "
                             "validation DAcc; test, family and attack figures never enter it",
           "detectors": results, "hf_energy_rule": {**hf, "bounds": rule.bounds},
           "attack_runs": data["attack_info"], "source_cache": data["source_cache"],
           "n": {g: {k: int(len(x)) for k, x in sets.items()} for g, sets in data["sets"].items()},
           "family_settings": FAMILIES, "versions": versions(), "threads": args.threads, "device": str(dev)}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "detectors.json"), "w") as f:
        json.dump(out, f, indent=2)
    md = markdown(out)
    with open(os.path.join(args.out, "detectors.md"), "w") as f:
        f.write(md)
    print(md)
    return 0


def argv_of(args) -> List[str]:
    a = ["report", "--detectors", *args.detectors]
    if args.attack_runs:
        a += ["--attack-runs", os.path.relpath(args.attack_runs, ROOT)]
    return a


def pct(v) -> str:
    return "-" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{100 * v:.1f}"


def markdown(o: dict) -> str:
    det = o["detectors"]
    names = list(det)
    srcs = list(next(iter(det.values()))["dacc_test"])
    real_groups = list(next(iter(det.values()))["fpr"])
    n = o["n"]
    L = [f"# CIFAR-10 detectors: `{o['command']}`", "",
         f"Default chosen on validation: **{o['chosen_on_validation']}** ({o['selection_rule']}). "
         f"Thresholds: each artifact's, calibrated at ensemble FPR <= {100 * det[names[0]]['target_fpr']:.0f}% on the "
         "calibration split. One detector seed each: no spread measured. All figures in %.", "",
         "## Transformation models and sub-detectors (the paper's Table VIII on this setting)", "",
         "| candidate | transform | sub-detector | " + " | ".join(f"DAcc {s}" for s in srcs) + " | "
         + " | ".join(f"FPR {g} (n={n['real'][g]})" for g in real_groups)
         + " | validation LOSO DAcc | validation DAcc | scoring ms/img |",
         "|" + "---|" * (3 + len(srcs) + len(real_groups) + 3)]
    for k, r in det.items():
        tr = ", ".join(sorted(set(r["transforms"].values())))
        star = " (default)" if k == o["chosen_on_validation"] else ""
        L.append(f"| {k}{star} | {tr} | {r['arch']} | " + " | ".join(pct(r["dacc_test"][s]) for s in srcs) + " | "
                 + " | ".join(pct(r["fpr"][g]) for g in real_groups)
                 + f" | {pct(r['validation_loso_mean'])} | {pct(r['validation_dacc_mean'])} | {r['ms_per_image_scoring']:.2f} |")
    L += ["", "## Leave one source out (test split of the held-out source; the other two sub-detectors, "
          "recalibrated on the calibration split)", "",
          "| held-out source | " + " | ".join(f"{k} DAcc / FPR cifar" for k in names) + " |",
          "|---|" + "---|" * len(names)]
    for s in srcs:
        L.append(f"| {s} | " + " | ".join(f"{pct(det[k]['loso'][s]['dacc_test'])} / {pct(det[k]['loso'][s]['fpr_cifar_test'])}"
                                          for k in names) + " |")
    hf = o["hf_energy_rule"]
    L += ["", "## Generator families in no training source (flagged share of the ensemble; "
          f"HF rule: the one-statistic baseline, FPR {pct(hf['fpr']['cifar_test'])} on CIFAR-10 test)", "",
          "| family (n) | " + " | ".join(names) + " | HF rule |", "|---|" + "---|" * (len(names) + 1)]
    for f in next(iter(det.values()))["families"]:
        L.append(f"| {f} ({n['families'][f]}) | " + " | ".join(pct(det[k]["families"][f]["ensemble"]) for k in names)
                 + f" | {pct(hf['families'][f])} |")
    if o["attack_runs"]:
        L += ["", "## The seven attacks' queries against the undefended victim, first and last recorded window "
              "(flagged share early / late)", "",
              "| attack (budget, window) | " + " | ".join(names) + " | HF rule |", "|---|" + "---|" * (len(names) + 1)]
        for a, info in o["attack_runs"].items():
            L.append(f"| {a} ({info['budget']}, {info['window']}) | "
                     + " | ".join(f"{pct(det[k]['attacks'][a]['early'])} / {pct(det[k]['attacks'][a]['late'])}" for k in names)
                     + f" | {pct(hf['attacks'][a + ':early'])} / {pct(hf['attacks'][a + ':late'])} |")
    return "\n".join(L) + "\n"


def cmd_families(args) -> int:
    torch.set_num_threads(args.threads)
    for name in args.families or list(FAMILIES):
        family_images(name, args.n, args.seed)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("families", help="generate and cache the held-out generator families")
    f.add_argument("--families", nargs="+", choices=list(FAMILIES), default=None)
    f.add_argument("--n", type=int, default=1000)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--threads", type=int, default=1)
    f.set_defaults(func=cmd_families)
    t = sub.add_parser("train", help="train the candidate detectors (sources from the config's cache)")
    t.add_argument("--candidates", nargs="+", choices=list(CANDIDATES), default=list(CANDIDATES))  # ablations too
    t.add_argument("--runs", default=os.path.join(ROOT, "runs", "cifar10", "detectors"))
    t.add_argument("--resume", action="store_true", help="skip candidates whose report.json exists")
    t.add_argument("--device", default=None)
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=cmd_train)
    r = sub.add_parser("report", help="score trained artifacts; write benchmarks/results/cifar10/detectors.{json,md}")
    r.add_argument("--detectors", nargs="+", required=True, metavar="NAME=DIR")
    r.add_argument("--attack-runs", default=None, help="guardian evaluate output of cifar10_attack_queries.yaml")
    r.add_argument("--n-family", type=int, default=1000)
    r.add_argument("--families", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    r.add_argument("--config", default=CONFIG, help="the training config the artifacts were trained with")
    r.add_argument("--out", default=OUT)
    r.add_argument("--device", default=None)
    r.add_argument("--threads", type=int, default=1)
    r.set_defaults(func=cmd_report)
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
