"""The committed MNIST example artifacts: they load, and they still measure what their report says."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from guardian_plugin.detector import load_detector
from guardian_plugin.guardian import Guardian, Verdict
from guardian_plugin.ledger import RefusalRule, open_ledger
from guardian_plugin.training.data import MNIST_MEAN, MNIST_STD, mnist_splits, normalise, photo_crops, to_float

torch.set_num_threads(1)
ART = os.path.join(os.path.dirname(__file__), "..", "examples", "mnist", "artifacts")


@pytest.fixture(scope="module")
def report():
    with open(os.path.join(ART, "detector", "report.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def detector():
    return load_detector(os.path.join(ART, "detector"))


def _fpr(det, x_u8):
    flagged = torch.cat([det.flag(to_float(x_u8[k:k + 250]))[0] for k in range(0, len(x_u8), 250)])
    return float(flagged.float().mean())


def test_report_meets_the_acceptance_bounds(report):
    assert report["fpr"]["digits"]["ensemble"] <= 0.02
    assert report["fpr"]["photos"]["ensemble"] <= 0.05
    assert report["dacc"]["dfme"]["ensemble"] >= 0.99
    assert report["dacc"]["gan"]["ensemble"] >= 0.90
    assert report["dacc"]["diffusion"]["ensemble"] >= 0.90


def test_held_out_real_figures_reproduce(detector, report):
    """Re-measure the held-out real groups with the committed weights: same numbers as the report."""
    digits = mnist_splits()["test"][0]
    assert _fpr(detector, digits) == pytest.approx(report["fpr"]["digits"]["ensemble"], abs=1e-9)
    ev = [e for e in report["config"]["real"]["evaluate"] if e["name"] == "photos"][0]
    photos = photo_crops(ev["group"], ev["n"], 28, 1, seed=ev["seed"])
    assert _fpr(detector, photos) == pytest.approx(report["fpr"]["photos"]["ensemble"], abs=1e-9)


def test_victim_accuracy_and_guardian_on_real_digits(detector):
    from examples.mnist.train_victim import load_victim

    victim = load_victim(ART)
    x, y = mnist_splits()["test"]
    xn = normalise(to_float(x[:200]), MNIST_MEAN, MNIST_STD)
    with torch.no_grad():
        probs = torch.softmax(victim(xn), 1)
    assert float((probs.argmax(1) == torch.from_numpy(y[:200])).float().mean()) > 0.95
    g = Guardian(detector, open_ledger("memory://", RefusalRule(14, 0.5)))
    r = g.inspect(xn, probs, ["benign"] * 200)
    assert sum(v == Verdict.FLAGGED for v in r.verdicts) <= 4  # <= 2%
    benign = torch.tensor([v == Verdict.BENIGN for v in r.verdicts])
    assert torch.equal(r.probs[benign], probs[benign])
    assert not g.refused(["benign"])[0]
