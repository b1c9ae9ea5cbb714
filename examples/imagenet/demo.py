"""The ImageNet demo: the pretrained EfficientNet-Lite0 served by a real TorchServe with its BUILT-IN
`image_classifier` handler, unprotected and behind `guardian protect`, answering natural photos and a
few synthetic images over HTTP.

    python -m examples.imagenet.demo [--detector DIR] [--input-fit area] [--synthetic 32] [--workdir DIR] [--keep]

1. In a work directory: the victim (serving.py) archived with torch-model-archiver and
   `--handler image_classifier`, then `guardian protect` with the detector (default: the example's
   artifacts/detector from `make imagenet-example`; ``--detector`` another, e.g. the stand-in of
   `python -m examples.imagenet.standin` with ``--input-fit area``).
2. TorchServe on loopback ports, 2 workers per model, batching on, both archives.
3. A benign client ("benign-user") sends the 20 foolbox ImageNet samples (JPEG, labelled) and the
   scikit-image / scikit-learn photos of the evaluate group (PNG) to both endpoints; every answer is
   printed: the unprotected top-1, and whether the protected answer differs (a flagged request gets
   DPreds: the same top-1, flattened probabilities; an unflagged one exactly the unprotected answer).
4. A "synthetic" client sends ``--synthetic`` images of randomly initialised 32 px generators,
   upsampled to 224 (examples/imagenet/standin.py), to the protected endpoint.
5. The ledger's view of both clients, and the server is stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from examples import torchserve_demo as demo
from examples.imagenet import build, serving as ix

BENIGN, SYNTH = "benign-user", "synthetic-client"


def photo_bodies():
    """The evaluate group's scikit-image / scikit-learn photos, whole, as PNG (names, bodies)."""
    from guardian_plugin.training.data import PHOTO_GROUPS, _load_photo

    names, bodies = [], []
    for name in PHOTO_GROUPS["evaluate"]:
        if name.startswith("lfw:"):
            continue
        for k, p in enumerate(_load_photo(name)):
            a = (np.repeat(p[..., None], 3, 2) if p.ndim == 2 else p) * 255
            names.append(name if k == 0 else f"{name}[{k}]")
            bodies.append(demo.png(a.round().clip(0, 255).astype(np.uint8)))
    return names, bodies


def differs(a, b, tol: float = 1e-3) -> bool:
    """Whether two ImageClassifier answers differ (labels or any probability by more than ``tol``)."""
    if a.status_code != 200 or b.status_code != 200:
        return a.status_code != b.status_code
    pa, pb = json.loads(a.text), json.loads(b.text)
    return set(pa) != set(pb) or any(abs(pa[k] - pb[k]) > tol for k in pa)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--detector", default=ix.DETECTOR, help="detector artifact (default: examples/imagenet/artifacts/detector)")
    ap.add_argument("--input-fit", default=None, choices=["center_crop", "resize", "area"],
                    help="guardian protect --input-fit (a detector trained below 224 px, e.g. the stand-in: area)")
    ap.add_argument("--synthetic", type=int, default=32, help="synthetic images the second client sends")
    ap.add_argument("--workdir", default=None, help="where the archives, server logs and ledger go (default: temp)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    a = ap.parse_args(argv)
    t0 = time.time()
    detector = os.path.abspath(a.detector)
    if not os.path.exists(os.path.join(detector, "detector.yaml")):
        sys.exit(f"no ImageNet detector artifact at {detector} (detector.yaml missing): `make imagenet-example` "
                 "trains it (docs/imagenet.md), or pass --detector DIR (e.g. the stand-in of "
                 "`python -m examples.imagenet.standin`, with --input-fit area)")

    from guardian_plugin.attacks.target import TorchServeTarget
    from examples.imagenet.standin import MODES, synthetic

    work, store, ledger_uri, guard_yaml = demo.workdir(a.workdir, "guardian-demo-imagenet-", ix.NAME)
    print(f"[1/5] the victim archived with --handler image_classifier, then guardian protect ({work})", flush=True)
    info = build.victim_step(work)
    mar = build.archive_step(store, work)
    demo.protect_archive(mar, detector, guard_yaml, os.path.join(store, f"{ix.NAME}_protected.mar"),
                         extra=["--input-fit", a.input_fit] if a.input_fit else [])
    names = ix.categories()

    print(f"[2/5] TorchServe: {ix.NAME} and {ix.NAME}_protected, 2 workers each, batching on", flush=True)
    ts = demo.serve(store, work, (ix.NAME, f"{ix.NAME}_protected"))
    try:
        print("[3/5] benign client: the 20 foolbox ImageNet samples and the evaluate group's photos, to both endpoints",
              flush=True)
        fb_bodies, labels, files = ix.foolbox_samples()
        ph_names, ph_bodies = photo_bodies()
        bodies = fb_bodies + ph_bodies
        plain = TorchServeTarget(ts.url, ix.NAME, 1000, ix.MEAN, ix.STD, client_id=BENIGN, labels=names)
        guarded = TorchServeTarget(ts.url, f"{ix.NAME}_protected", 1000, ix.MEAN, ix.STD, client_id=BENIGN, labels=names)
        r_plain, r_guarded = plain.send(bodies), guarded.send(bodies)
        top_plain, top_guarded = ix.top1(r_plain, names), ix.top1(r_guarded, names)
        flagged = [differs(p, g) for p, g in zip(r_plain, r_guarded)]
        print(f"      {'image':34s} {'label':>5s}  {'unprotected top-1':30s} protected")
        for i, (f, p, g, fl) in enumerate(zip(files + ph_names, top_plain, top_guarded, flagged)):
            label = str(labels[i]) if i < len(labels) else "-"
            mark = "" if i >= len(labels) else (" ok" if p == labels[i] else " WRONG")
            print(f"      {f:34s} {label:>5s}  {(names[p] if p >= 0 else 'HTTP error')[:24] + mark:30s} "
                  f"{'same top-1, DPreds (flagged)' if fl and g == p else 'DIFFERENT TOP-1' if g != p else 'identical answer'}")

        print(f"[4/5] synthetic client: {a.synthetic} images of untrained 32 px generators upsampled to 224 "
              "(PNG) to the protected endpoint", flush=True)
        per = -(-a.synthetic // len(MODES))
        synth = np.concatenate([synthetic(per, ix.SIZE, m, seed=100 + k) for k, m in enumerate(MODES)])[:a.synthetic]
        attacker = TorchServeTarget(ts.url, f"{ix.NAME}_protected", 1000, ix.MEAN, ix.STD, client_id=SYNTH, labels=names)
        r_synth = []
        for i in range(0, len(synth), 8):  # a few requests at a time, as a client that keeps going would
            r_synth += attacker.send(demo.png_bodies(synth[i:i + 8]))
        codes = {c: sum(r.status_code == c for r in r_synth) for c in sorted({r.status_code for r in r_synth})}
    finally:
        ts.stop()

    print("[5/5] the ledger", flush=True)
    from guardian_plugin.ledger import open_ledger

    import yaml

    from guardian_plugin.config import RuleConfig

    with open(guard_yaml) as f:
        rule = RuleConfig.model_validate(yaml.safe_load(f)["rule"])
    ledger = open_ledger(ledger_uri, rule.to_rule(), ix.NAME)
    ben, syn = ledger.get(BENIGN), ledger.get(SYNTH)
    n_fb = len(labels)
    summary = {
        "detector": detector, "input_fit": a.input_fit,
        "victim_top1_foolbox_in_process": info["foolbox_imagenet_top1"],
        "top1_foolbox_unprotected": sum(p == y for p, y in zip(top_plain, labels)) / n_fb,
        "top1_foolbox_protected": sum(p == y for p, y in zip(top_guarded, labels)) / n_fb,
        "benign_images": len(bodies), "benign_answers_changed": int(sum(flagged)),
        "benign_top1_changed": int(sum(p != g for p, g in zip(top_plain, top_guarded))),
        "benign_ledger": {"queries": ben.queries, "flagged": ben.flagged, "refused": ben.refused},
        "synthetic_images": len(synth), "synthetic_statuses": codes,
        "synthetic_ledger": {"queries": syn.queries, "flagged": syn.flagged, "refused": syn.refused,
                             "refused_at_query": syn.refused_at_query},
        "rule": {"tau": rule.resolve_tau(), "rho": rule.rho},
        "total_seconds": round(time.time() - t0, 1),
    }
    s = summary
    print()
    print("Model-Guardian on TorchServe: ImageNet example (EfficientNet-Lite0, built-in image_classifier handler)")
    print(f"  {'top-1, 20 foolbox ImageNet samples':38s}: unprotected {s['top1_foolbox_unprotected']:.0%}, protected "
          f"{s['top1_foolbox_protected']:.0%} (in process {s['victim_top1_foolbox_in_process']:.0%})")
    print(f"  {'benign photos flagged (DPreds)':38s}: {ben.flagged} of {ben.queries} protected queries; "
          f"{s['benign_top1_changed']} top-1 changed; refused: {'yes' if ben.refused else 'no'}")
    print(f"  {'synthetic client':38s}: {syn.flagged} of {syn.queries} answered queries flagged; HTTP {codes}; "
          + (f"refused at query {syn.refused_at_query} (tau={s['rule']['tau']}, rho={s['rule']['rho']})" if syn.refused
             else "not refused"))
    print(f"  {'detector':38s}: {detector}" + (f" (--input-fit {a.input_fit})" if a.input_fit else ""))
    demo.finish(work, a.keep or a.workdir is not None, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
