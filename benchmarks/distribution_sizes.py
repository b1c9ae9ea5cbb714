"""The per-client distribution test at served input sizes other than the detector's (issue #25, item 3).

    python benchmarks/distribution_sizes.py [--part mnist|cifar10|both] [--calibration-images 1000]
        [--test-images 1000] [--out benchmarks/results/distribution_sizes.json]

MNIST (in process, the committed example): the victim takes 28-31 px digits; the detector center-crops
them to its 28 px. Through the shipped defense_in_depth guard settings (guard-config defaults +
probation 200, memory ledger; examples.mnist.serving.stream, requests of 10 images), for each size and
padding (the extra rows/columns before the digit, after it, or split):
- the 1,000 held-out digits (never the reference's split) as one benign client: the block statistics against
  the reference (blocks of 200; the test fails a block at n KL(k/n || s) >= ln(1/alpha) = 17.7,
  guardian_plugin.distribution), the query at which it
  was refused (None: never), the victim's accuracy; and, as a control, the same digits at 28 px shifted
  inside the frame by the padding's offset;
- a randomly initialised generator kept in BatchNorm eval mode (600 images, flagged 0% per sample): the
  query at which it was refused, with the distribution test and without it.

CIFAR-10 (its served example, needs ../shared/data and the CIFAR-10 detector): the victim behind
TorchServe's image_classifier (Resize 256 + CenterCrop 224), protected with ``--input-fit area`` and
the same guard settings, once without ``--calibrate`` (the reference at 32 px: the worker switches the
test off, `enabled: auto`) and once with ``--calibrate`` on the first N calibration-split images (the
reference rebuilt on the served path). The protected archive is loaded as a worker loads it, and
benign clients send, through that worker's Guardian: the 1,000 test images, and the calibration
images the served reference was not built on (the held-out half); the block statistics against the served
reference and against the 32 px one, and when each client was refused. CPU, a few minutes.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

DEPTH = {"ledger": "memory://", "probation": {"queries": 200}}  # the shipped defense_in_depth settings


def block_stats(test, probs: torch.Tensor, scores: torch.Tensor, thresholds: torch.Tensor, block: int = 200):
    """The test's statistic for each consecutive complete block of ``block`` rows, and its threshold."""
    bins = test.reference.bin_of(probs, scores, thresholds)
    out = [test.evaluate(test.reference.counts(bins[i:i + block])) for i in range(0, len(bins) - block + 1, block)]
    return [round(d, 4) for _, d, _ in out], (round(out[0][2], 4) if out else None)


def mnist(args) -> dict:
    from examples.mnist import serving as ex
    from guardian_plugin.config import parse_config
    from guardian_plugin.guardian import Guardian
    from guardian_plugin.training.data import mnist_splits

    victim = torch.jit.load(ex.VICTIM_TS, map_location="cpu").eval()
    x, y = mnist_splits()["test"]
    digits, fakes = x[:, 0], ex.decode_pngs(ex.generator_images(600, seed=0, bn_eval=True))

    def guardian(enabled="auto"):
        return Guardian.from_config(parse_config({"detector": ex.DETECTOR, **DEPTH, "distribution": {"enabled": enabled}}))

    def benign(a):
        g = guardian()
        inp = ex.as_input(a)
        with torch.no_grad():
            probs = torch.softmax(victim(inp), 1)
        _, scores = g.detector.flag(g.detector.to_pixels(inp))
        kls, t = block_stats(g.distribution, probs, scores, g.detector.thresholds)
        out = {"block_statistic": kls, "t": t, "refused_at": ex.stream(g, victim, inp, "benign").refused_at}
        if len(a) == len(y):
            out["accuracy"] = round(float((probs.argmax(1).numpy() == y).mean()), 4)
        return out

    rows = []
    for size in (28, 29, 30, 31):
        for where in (("top_left",) if size == 28 else ex.PAD_PLACES):
            k = {"top_left": size - 28, "bottom_right": 0, "center": (size - 28) // 2}[where]
            row = {"size": size, "padding": where, "benign": benign(ex.pad_to(digits, size, where))}
            if k:
                row["benign_28px_shifted_control"] = benign(np.pad(digits, ((0, 0), (k, 0), (k, 0)))[:, :28, :28])
            f = ex.as_input(ex.pad_to(fakes, size, where))
            t = ex.stream(guardian(), victim, f, "bn-eval")
            row["bn_eval"] = {"block_statistic": benign(ex.pad_to(fakes, size, where))["block_statistic"],
                              "refused_at": t.refused_at, "detector_flagged": t.flagged,
                              "suspect_answers": t.suspect_answers,
                              "refused_at_without_distribution_test": ex.stream(guardian(False), victim, f, "bn-eval").refused_at}
            rows.append(row)
            b, c = row["benign"], row.get("benign_28px_shifted_control")
            print(f"MNIST {size} px {where:12s} benign statistic {b['block_statistic']} refused {b['refused_at']} acc {b['accuracy']:.3f}"
                  + (f" | 28 px shifted {k}: statistic max {max(c['block_statistic']):.3f} refused {c['refused_at']}" if c else "")
                  + f" | bn-eval statistic {row['bn_eval']['block_statistic']} refused {t.refused_at} (flagged {t.flagged}; without the test "
                    f"{row['bn_eval']['refused_at_without_distribution_test']})", flush=True)
    return {"rows": rows, "settings": DEPTH, "fakes": 600, "benign": int(len(digits))}


def cifar10(args) -> dict:
    import yaml

    from examples.cifar10 import serving as cx
    from guardian_plugin.attacks.target import EvalTarget, QueryRefused
    from guardian_plugin.distribution import DistributionTest, load_reference
    from guardian_plugin.handlers.archive import archive_handler, protect, read_archive
    from guardian_plugin.handlers.guard import to_probabilities
    from guardian_plugin.training.data import cifar10_split

    out = {}
    with tempfile.TemporaryDirectory() as work:
        store = os.path.join(work, "store")
        os.makedirs(store)
        os.environ.setdefault("GUARDIAN_STATE_DIR", os.path.join(work, "state"))
        mar = cx.build_served_archive(work, store)
        cfg = os.path.join(work, "guard.yaml")
        with open(cfg, "w") as f:
            yaml.safe_dump(DEPTH, f)
        folder = cx.calibration_folder(os.path.join(work, "cal"), args.calibration_images)
        plain = protect(mar, cx.DETECTOR, os.path.join(store, "plain.mar"), config=cfg, input_fit="area")
        t0 = time.time()
        cal = protect(mar, cx.DETECTOR, os.path.join(store, "cal.mar"), config=cfg, input_fit="area", calibrate=folder)
        out["protect_seconds_calibrate"] = round(time.time() - t0, 1)
        out["distribution_without_calibrate"] = plain["distribution"]
        out["distribution_with_calibrate"] = cal["distribution"]
        out["served_reference"] = cal["calibration"]["distribution_reference"]
        print(f"CIFAR-10 protect: without --calibrate: {plain['distribution']}\n  with --calibrate "
              f"({args.calibration_images} images): {cal['distribution']}", flush=True)
        native = DistributionTest(load_reference(cx.DETECTOR))
        x_test, _ = cifar10_split("test", args.test_images)
        x_cal, _ = cifar10_split("calibrate", args.calibration_images)
        clients = {"test images": x_test, "calibration images, held-out half": x_cal[1::2]}
        with archive_handler(*read_archive(os.path.join(store, "plain.mar"))) as w:
            out["worker_without_calibrate_off"] = w.guard.guardian.distribution.off
        with archive_handler(*read_archive(os.path.join(store, "cal.mar"))) as w:
            g, inner = w.guard.guardian, w.guard.inner
            out["worker_with_calibrate_off"] = g.distribution.off
            for name, xs in clients.items():
                t = EvalTarget(inner.model, 10, g, client_id=name)
                probs, scores = [], []
                for i in range(0, len(xs), 100):
                    xb = cx.handler_preprocess(cx.png_bodies(xs[i:i + 100]))
                    with torch.no_grad():
                        probs.append(to_probabilities(inner.model(xb), "logits"))
                    scores.append(g.detector.flag(g.detector.to_pixels(xb))[1])
                    for j in range(0, len(xb), 10):
                        if t.refused_at is None:
                            try:
                                t.query(xb[j:j + 10])
                            except QueryRefused:
                                pass
                p, s = torch.cat(probs), torch.cat(scores)
                kl_served, t_served = block_stats(g.distribution, p, s, g.detector.thresholds)
                kl_native, _ = block_stats(native, p, s, g.detector.thresholds)
                out[name] = {"n": int(len(xs)), "refused_at": t.refused_at, "suspect_answers": t.suspect_answers,
                             "detector_flagged": t.flagged, "block_statistic_served_reference": kl_served, "t": t_served,
                             "block_statistic_32px_reference": kl_native}
                print(f"CIFAR-10 served, {name} ({len(xs)}): served-reference block statistic {kl_served} (t {t_served}), "
                      f"32 px reference {kl_native}; refused at {t.refused_at}, suspect answers {t.suspect_answers}",
                      flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["mnist", "cifar10", "both"], default="both")
    ap.add_argument("--calibration-images", type=int, default=1000)
    ap.add_argument("--test-images", type=int, default=1000)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "distribution_sizes.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    result = {"benchmark": "distribution_sizes", "torch": torch.__version__}
    if args.part in ("mnist", "both"):
        result["mnist"] = mnist(args)
    if args.part in ("cifar10", "both"):
        result["cifar10"] = cifar10(args)
    result["seconds"] = round(time.time() - t0, 1)
    from benchmarks.fuzz_requests import write_report

    return write_report(os.path.abspath(args.out), result, [], f"{result['seconds']:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
