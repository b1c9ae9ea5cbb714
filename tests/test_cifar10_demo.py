"""`python -m examples.cifar10.demo` against a real TorchServe (the built-in image_classifier handler,
`guardian protect --input-fit area --calibrate`), with a few benign images and a small DFME budget. It needs the
shared CIFAR-10 copy (../shared/data or $GUARDIAN_DATA) and the CIFAR-10 detector artifact
(examples/cifar10/artifacts/detector from `make train-cifar10`, or $GUARDIAN_TEST_CIFAR10_DETECTOR);
it skips, saying which is missing, without them."""

from __future__ import annotations

import json
import os
import sys

import pytest
from test_cifar10_data import needs_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from examples.cifar10 import demo, serving as cx  # noqa: E402

DETECTOR = os.environ.get("GUARDIAN_TEST_CIFAR10_DETECTOR") or cx.DETECTOR
needs_detector = pytest.mark.skipif(
    not os.path.exists(os.path.join(DETECTOR, "detector.yaml")),
    reason=f"no CIFAR-10 detector artifact at {DETECTOR} (train it with `make train-cifar10`, or set "
           "GUARDIAN_TEST_CIFAR10_DETECTOR)")
IMAGES, BUDGET = 8, 224  # two DFME iterations of 16 x (2 + 5) queries
CALIBRATION = 200  # calibration-split images for `guardian protect --calibrate` (the fewest a 1% target takes)


def test_missing_detector_names_the_make_target(tmp_path):
    with pytest.raises(SystemExit, match="make train-cifar10"):
        demo.main(["--detector", str(tmp_path / "nowhere")])


@needs_data
@needs_detector
def test_demo_end_to_end(tmp_path, capsys):
    pytest.importorskip("ts")
    work = tmp_path / "work"
    assert demo.main(["--images", str(IMAGES), "--attack-budget", str(BUDGET), "--detector", DETECTOR,
                      "--calibration-images", str(CALIBRATION), "--device", "cpu", "--workdir", str(work)]) == 0
    out = capsys.readouterr().out
    for label in ("benign accuracy, unprotected endpoint", "benign accuracy, protected endpoint",
                  "benign accuracy, in process, 32 px", "benign flagged share, in process",
                  "thresholds", "attacker (DFME) flagged share", "attacker's clone accuracy"):
        assert label in out
    with open(work / "demo-summary.json") as f:
        s = json.load(f)
    assert s["benign_queries"] == IMAGES and not s["benign_refused"]
    # a flagged answer keeps its top-1 (DPreds), so guarding never changes the benign accuracy
    assert s["benign_accuracy_protected"] == s["benign_accuracy_unprotected"]
    # the served answers are the handler's preprocessing + the wrapper, as replayed in process
    assert abs(s["benign_accuracy_unprotected"] - s["in_process_accuracy_handler_geometry"]) <= 1 / IMAGES
    # the thresholds were re-set on the served path, and the workers flag what the embedded ones flag in process
    c = s["served_calibration"]
    assert (c["images"], c["calibrated_on"], c["input_fit"]) == (CALIBRATION, CALIBRATION // 2, "area")
    assert c["thresholds_after"] != c["thresholds_before"]
    assert c["flagged_share_calibration_after"] <= c["target_fpr"]
    assert abs(s["benign_flagged_share"] - s["in_process_flagged_share_handler_geometry"]) <= 1 / IMAGES
    for k in ("in_process_accuracy_32px", "in_process_flagged_share_32px", "in_process_flagged_share_handler_geometry"):
        assert 0.0 <= s[k] <= 1.0
    assert 0 < s["attacker_queries_answered"] <= BUDGET
    if s["attacker_refused"]:
        assert s["attacker_refused_at_query"] >= s["rule"]["tau"]
        assert s["attacker_first_403_after"] is not None
