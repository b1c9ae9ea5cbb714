"""A detector's thresholds re-set on the path a deployment serves: `guardian protect --calibrate DIR`
(a TorchServe archive's own preprocess) and `guardian calibrate` (any preprocess function, e.g. a
BentoML service's; writes a new artifact).

A detector's thresholds come from its training pipeline's calibration images at the detector's own
size and geometry. What a deployment's guard scores can differ: a handler that resizes (TorchServe's
``image_classifier``: Resize 256 + CenterCrop 224 in front of a 32 px detector moved the CIFAR-10
detector's benign flag rate from 1.0% to 7.6%, docs/cifar10.md), or clients whose images differ from
the defender's training split. Here the benign images (files, as clients send them) go through the
deployment's preprocess and the detector's input mapping, exactly what the guard scores;
detector.calibrate (the training pipeline's rule) sets the thresholds at the artifact's target FPR on
every other image (sorted by name), and the other half, held out, measures the benign flagged share
before and after. The report goes beside detector.yaml as ``served_calibration.json``.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import sys
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np
import torch

from guardian_plugin.errors import ConfigError

CALIBRATION_FILE = "served_calibration.json"  # beside detector.yaml: what the calibration measured


def image_files(path: str) -> List[Tuple[str, bytes]]:
    """(name, bytes) of every file in ``path`` (hidden ones skipped), sorted by name: request bodies."""
    if not os.path.isdir(path):
        raise ConfigError(f"calibration images {path}: not a directory")
    names = sorted(n for n in os.listdir(path) if not n.startswith(".") and os.path.isfile(os.path.join(path, n)))
    out = []
    for n in names:
        with open(os.path.join(path, n), "rb") as f:
            out.append((n, f.read()))
    return out


def needed(target_fpr: float) -> int:
    """2 / target FPR: the threshold is the (1 - FPR) quantile of the calibrating half's scores, which
    needs at least 1 / FPR images to exist at all (100 at 1%: the top one is the 1% tail), and the
    held-out half measures the flagged share on as many again."""
    return 2 * math.ceil(1.0 / target_fpr)


def check_count(images: list, target_fpr: float, where: str, crops_option: str = "--calibrate-crops",
                crops: int = 1) -> None:
    """At least :func:`needed` images (after ``crops`` per file), else a ConfigError saying how to get them."""
    need = needed(target_fpr)
    n = len(images) * crops
    if n < need:
        what = f"{len(images)} files" + (f" x {crops} crops = {n} images" if crops > 1 else "")
        more = math.ceil(need / max(1, len(images)))
        raise ConfigError(
            f"calibration images {where}: {what}, but a target false-positive rate of {target_fpr:g} needs at least "
            f"{need}: the threshold is the {1 - target_fpr:.0%} quantile of the calibrating half's scores, which "
            f"needs {need // 2} images to exist, and the other half checks it. Add benign images, or take several "
            f"crops of each: {crops_option} {more} ({len(images)} x {more} = {len(images) * more}; each crop is "
            "sent as a client upload, and each file's crops stay in one half so the check is on other files; "
            "crops of one photo are not independent images: the rate then describes these photos)"
            if len(images) >= 2 else
            f"calibration images {where}: {what}, but a target false-positive rate of {target_fpr:g} needs at least "
            f"{need} images, from at least 2 files (one half calibrates, the other checks): add benign images")


def photo_crops(images: List[Tuple[str, bytes]], crops: int, seed: int = 0, min_frac: float = 0.5
                ) -> Tuple[List[Tuple[str, bytes]], np.ndarray]:
    """(``crops`` uploads per file, held-out mask): crop 0 is the file itself, the others random crops
    (each side a fraction ``min_frac``-1 of the image's, anywhere in it) scaled back to the file's own
    width and height (a handler that takes one input size takes them too) and encoded as PNG: a zoom
    into the picture, as a client might send. The mask puts every crop of a file in the same half (every
    other file held out), so the held-out share is measured on files the thresholds never saw."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out, held = [], []
    for i, (name, body) in enumerate(images):
        try:
            img = Image.open(io.BytesIO(body))
            img.load()
        except Exception as e:  # noqa: BLE001 - name the file
            raise ConfigError(f"calibration image {name}: cannot be opened to crop ({type(e).__name__}: {e})") from None
        out.append((name, body))
        w, h = img.size
        for k in range(1, crops):
            f = rng.uniform(min_frac, 1.0)
            cw, ch = max(1, int(round(w * f))), max(1, int(round(h * f)))
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            buf = io.BytesIO()
            img.crop((x, y, x + cw, y + ch)).resize((w, h), Image.BICUBIC).save(buf, "PNG")
            out.append((f"{name}#crop{k}", buf.getvalue()))
        held += [i % 2 == 1] * crops
    return out, np.asarray(held)


def alternate(n: int) -> np.ndarray:
    """The default held-out mask: every other image (sorted by name)."""
    return np.arange(n) % 2 == 1


def calibration_set(image_dir: str, target_fpr: float, crops: int = 1, crops_option: str = "--calibrate-crops"
                    ) -> Tuple[List[Tuple[str, bytes]], np.ndarray]:
    """(uploads, held-out mask) of ``image_dir``: its files, with ``crops`` > 1 each file and crops of it."""
    if crops < 1:
        raise ConfigError(f"{crops_option} {crops}: must be at least 1 (1: the files as they are)")
    images = image_files(image_dir)
    check_count(images, target_fpr, image_dir, crops_option, crops)
    return photo_crops(images, crops) if crops > 1 else (images, alternate(len(images)))


def served_scores(detector, preprocess: Callable[[bytes], torch.Tensor], images: List[Tuple[str, bytes]],
                  batch: int = 64) -> np.ndarray:
    """(N, K) detector scores of the images as a guard sees them: ``preprocess(body)`` -> the model's
    (1, C, H, W) input, then the detector's input mapping (its fit included), in batches of consecutive
    same-shaped inputs. A file the preprocess fails on is a ConfigError naming it."""
    return served_features(detector, preprocess, images, batch)[0]


def served_features(detector, preprocess: Callable[[bytes], torch.Tensor], images: List[Tuple[str, bytes]],
                    batch: int = 64, infer: Callable[[torch.Tensor], torch.Tensor] | None = None):
    """(scores (N, K), probabilities (N, classes) or None, input sizes [[H, W], ...]) of the images as a
    guard sees them (served_scores); ``infer``: the model's probabilities for a preprocessed batch (the
    distribution test's other feature), None to skip them."""
    from tqdm import tqdm

    out, probs, sizes, pending = [], [], [], []

    def flush():
        if pending:
            x = torch.cat(pending)
            out.append(detector.scores(detector.to_pixels(x)).float().cpu().numpy())
            if infer is not None:
                with torch.no_grad():
                    probs.append(infer(x).detach().float().cpu())
            if list(x.shape[-2:]) not in sizes:
                sizes.append(list(x.shape[-2:]))
            pending.clear()

    for name, body in tqdm(images, desc="served calibration", unit="image", disable=None, leave=False):
        try:
            x = preprocess(body)
        except Exception as e:  # noqa: BLE001 - the deployment's own decoding: name the file
            raise ConfigError(f"calibration image {name}: the preprocess cannot take it ({type(e).__name__}: {e})") from None
        if isinstance(x, torch.Tensor) and x.dim() == 3:
            x = x.unsqueeze(0)
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[0] != 1:
            raise ConfigError(f"calibration image {name}: the preprocess gave {type(x).__name__} "
                              f"{tuple(getattr(x, 'shape', ()))}, not one image tensor")
        if pending and (x.shape != pending[0].shape or len(pending) == batch):
            flush()
        pending.append(x.detach().float().to(detector.thresholds.device))
    flush()
    return np.concatenate(out), (torch.cat(probs) if infer is not None else None), sizes


def envelope_uploads(images: List[Tuple[str, bytes]], rows: Sequence[int], specs: Sequence[str], limit: int,
                     seed: int = 0) -> Dict[str, Tuple[List[Tuple[str, bytes]], np.ndarray]]:
    """spec -> (uploads, their reference rows): the first ``limit`` of the images ``rows`` under each
    nuisance (guardian_plugin.nuisance), encoded as PNG (lossless: the nuisance is the only change), for
    the distribution reference's benign envelope on the served path."""
    from PIL import Image

    from guardian_plugin import nuisance

    picked = list(rows)[:limit]
    decoded = []
    for i in picked:
        name, body = images[i]
        try:
            img = Image.open(io.BytesIO(body))
            img.load()
        except Exception as e:  # noqa: BLE001 - name the file
            raise ConfigError(f"calibration image {name}: cannot be opened for the reference envelope "
                              f"({type(e).__name__}: {e})") from None
        decoded.append((name, img.convert("L") if img.mode in ("L", "1", "I;16", "I", "F") else img.convert("RGB")))
    out = {}
    for k, spec in enumerate(specs):
        fn, rng, ups = nuisance.parse(spec), np.random.default_rng(seed * 100 + k), []
        for name, img in decoded:
            buf = io.BytesIO()
            fn(img, rng).save(buf, "PNG", compress_level=1)
            ups.append((f"{name}#{spec}", buf.getvalue()))
        out[spec] = (ups, np.asarray(picked, dtype=np.int64))
    return out


def served_reference(scores: np.ndarray, probs: torch.Tensor, thresholds, sizes: List[List[int]], block: int,
                     source: str, held: np.ndarray | None = None, envelope: Dict[str, tuple] | None = None
                     ) -> Tuple[object, dict]:
    """(reference, report): the distribution test's reference (guardian_plugin.distribution) built on the
    served path, from the calibration rows (every other image, as for the thresholds) at the new
    ``thresholds``, recording the served input ``sizes``; ``envelope``: spec -> (scores, probs, rows) of
    the calibration rows ``rows`` (indices into all images) under each nuisance. The held-out rows, in
    consecutive blocks of ``block`` (or one block of all of them when fewer), measure what a benign
    client's blocks give."""
    from guardian_plugin.distribution import DistributionTest, build_reference

    thr = torch.as_tensor(np.asarray(thresholds, dtype=np.float32))
    s = torch.from_numpy(scores)
    h = torch.from_numpy(alternate(len(scores)) if held is None else held)
    ref_rows = np.flatnonzero(~h.numpy())
    position = {int(r): j for j, r in enumerate(ref_rows)}  # image index -> row of the reference set
    env = {spec: (p, torch.from_numpy(sc), [position[int(r)] for r in rows])
           for spec, (sc, p, rows) in (envelope or {}).items()}
    ref = build_reference(probs[~h], s[~h], thr, source, env, input_sizes=sizes)
    test = DistributionTest(ref, block)
    bins = ref.bin_of(probs[h], s[h], thr)
    n = min(block, len(bins))
    stats = [test.evaluate(ref.counts(bins[i:i + n]))[1:] for i in range(0, len(bins) - n + 1, n)] if n else []
    report = {"built_on": ref.n, "input_sizes": sizes, "groups": len(ref.rates), "envelope": ref.envelope,
              "envelope_images": len(next(iter(env.values()))[2]) if env else 0,
              "rates": ref.rates, "conf_edge": ref.conf_edge, "held_out_block": n,
              "held_out_block_statistic": [round(k, 4) for k, _ in stats],
              "threshold": round(stats[0][1], 4) if stats else None,
              "held_out_blocks_failed": sum(k >= t for k, t in stats)}
    return ref, report


def recalibrate(detector, scores: np.ndarray, target_fpr: float, held_out: np.ndarray | None = None,
                **about) -> Tuple[np.ndarray, dict]:
    """(new thresholds, report) from served scores: the rows not in ``held_out`` (default: every other
    row) calibrate (detector.calibrate), the rest are held out; ``about`` goes into the report as it is
    (where the images came from...)."""
    from guardian_plugin.detector import calibrate

    mask = alternate(len(scores)) if held_out is None else held_out
    cal, held = scores[~mask], scores[mask]
    before = detector.thresholds.cpu().numpy().astype(np.float32)
    after, level, _ = calibrate({"served": cal}, target_fpr)
    share = lambda s, thr: float((s >= thr).any(1).mean())  # noqa: E731
    report = {**about, "images": len(scores), "calibrated_on": len(cal), "held_out": len(held),
              "target_fpr": target_fpr, "input_fit": detector.spec.input.fit, "quantile_level": level,
              "thresholds_before": dict(zip(detector.names, map(float, before))),
              "thresholds_after": dict(zip(detector.names, map(float, after))),
              "flagged_share_calibration_before": share(cal, before),
              "flagged_share_calibration_after": share(cal, after),
              "flagged_share_held_out_before": share(held, before),
              "flagged_share_held_out_after": share(held, after)}
    return after, report


def set_thresholds(raw: dict, thresholds) -> None:
    """Write ``thresholds`` into a detector.yaml document (its sub-detectors, in order)."""
    for sub, v in zip(raw["subdetectors"], thresholds):
        sub["threshold"] = float(v)


def summary(report: dict, how: str) -> str:
    """One line: what the calibration changed (the commands print it)."""
    r = report
    return (f"served calibration on {r['images']} images through {how} (input fit {r['input_fit']}, target FPR "
            f"{r['target_fpr']:.2%}): benign flagged share on the {r['held_out']} held out "
            f"{r['flagged_share_held_out_before']:.2%} -> {r['flagged_share_held_out_after']:.2%}; thresholds "
            + ", ".join(f"{k} {v:.3f} -> {r['thresholds_after'][k]:.3f}" for k, v in r["thresholds_before"].items()))


def load_fitted(detector_dir: str, input_fit: str | None = None):
    """The artifact's detector (eval mode), its ``input.fit`` replaced by ``input_fit`` if given."""
    from guardian_plugin.detector import load_detector, with_input_fit

    detector = load_detector(detector_dir).eval()
    if input_fit:
        detector.spec = with_input_fit(detector.spec, input_fit)
    return detector


# ------------------------------------------------------------------------------ guardian calibrate
def load_function(spec: str) -> Callable:
    """``module:function`` (the current directory importable, as for `python -m`)."""
    import importlib

    module, _, name = spec.partition(":")
    if not module or not name:
        raise ConfigError(f"--preprocess {spec!r}: expected MODULE:FUNCTION")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"--preprocess {spec}: {type(e).__name__}: {e}") from None
    if not callable(fn):
        raise ConfigError(f"--preprocess {spec}: not callable")
    return fn


def calibrate_artifact(detector_dir: str, image_dir: str, preprocess: Callable, out_dir: str,
                       input_fit: str | None = None, about: Dict | None = None, crops: int = 1) -> dict:
    """Copy the artifact ``detector_dir`` to ``out_dir`` (which must not exist or be empty) with its
    thresholds re-set on ``preprocess(PIL image)`` of the images in ``image_dir`` (and ``input.fit``
    replaced by ``input_fit``, if given). Returns the report, also written to out_dir."""
    import yaml
    from PIL import Image

    from guardian_plugin.detector import DETECTOR_YAML, load_detector

    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise ConfigError(f"{out_dir} exists and is not empty: pass a new directory for the calibrated artifact")
    detector = load_fitted(detector_dir, input_fit)
    images, held = calibration_set(image_dir, float(detector.spec.target_fpr), crops, "--crops")
    scores = served_scores(detector, lambda body: preprocess(Image.open(io.BytesIO(body))), images)
    thresholds, report = recalibrate(detector, scores, float(detector.spec.target_fpr), held,
                                     image_dir=os.path.abspath(image_dir), crops_per_file=crops, **(about or {}))
    shutil.copytree(detector_dir, out_dir, dirs_exist_ok=True)
    path = os.path.join(out_dir, DETECTOR_YAML)
    with open(path) as f:
        raw = yaml.safe_load(f)
    set_thresholds(raw, thresholds)
    raw["input"] = detector.spec.input.model_dump()
    with open(path, "w") as f:
        yaml.safe_dump(raw, f, sort_keys=False)
    with open(os.path.join(out_dir, CALIBRATION_FILE), "w") as f:
        json.dump(report, f, indent=1)
    load_detector(out_dir)  # the written artifact loads
    return report


def _calibrate(args) -> int:
    fn = load_function(args.preprocess)
    report = calibrate_artifact(args.detector, args.images, fn, args.output, args.input_fit, crops=args.crops,
                                about={"preprocess": args.preprocess, "source_artifact": os.path.abspath(args.detector)})
    print(f"wrote {args.output}: " + summary(report, args.preprocess))
    return 0


def register(subparsers) -> None:
    from guardian_plugin.detector import INPUT_FITS

    p = subparsers.add_parser(
        "calibrate", help="re-set a detector artifact's thresholds on your own preprocess (a new artifact)",
        description="Write a copy of a detector artifact whose thresholds are re-set on the path your service "
                    "serves: the benign images in --images (files as clients send them; at least 2 / target "
                    "FPR) are opened with PIL, passed to --preprocess (the function that gives your model its "
                    "input tensor, e.g. what a BentoML service's preprocess does) and scored by the detector "
                    "through its input mapping; the thresholds are set at the artifact's target FPR on every "
                    "other image and the rest are held out to report the benign flagged share before and "
                    "after. For TorchServe archives, `guardian protect --calibrate DIR` does this with the "
                    "archive's own preprocess.")
    p.add_argument("--detector", required=True, help="the detector artifact directory to start from (not changed)")
    p.add_argument("--images", required=True, help="folder of benign images, as your clients send them")
    p.add_argument("--preprocess", required=True, metavar="MODULE:FUNCTION",
                   help="function(PIL.Image) -> the model's input tensor, (C, H, W) or (1, C, H, W), normalised "
                        "as the detector's input mapping expects")
    p.add_argument("--input-fit", choices=INPUT_FITS, help="replace the artifact's input.fit (as protect --input-fit)")
    p.add_argument("--crops", type=int, default=1, metavar="N",
                   help="with fewer images than 2 / target FPR: N uploads per file (the file and N - 1 random "
                        "crops of it, as PNG), every crop of a file in the same half (default 1: the files only)")
    p.add_argument("-o", "--output", required=True, help="directory for the calibrated artifact (new or empty)")
    p.set_defaults(func=_calibrate)
