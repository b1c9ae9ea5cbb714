"""The served benign-traffic suite (benchmarks/benign_suite_served.py) on the CIFAR-10 example through a
real TorchServe: the archive protected with `guardian protect --input-fit area --calibrate` (the
distribution test on, its reference rebuilt on the served path), issued API keys, two clients at a few
hundred queries over HTTP. What the full suite finds is measured, not asserted here (docs/refusal-rule.md);
this checks the machinery: complete report rows, the control client answered, answers told apart."""

from __future__ import annotations

import json
import os
import sys

import pytest
from test_cifar10_data import needs_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import benign_suite as bs, benign_suite_served as served  # noqa: E402

QUERIES = 220  # past the distribution test's first block of 200: the test has decided once


def test_answers_are_told_apart():
    plain = {"cat": 0.7, "dog": 0.2, "frog": 0.05, "ship": 0.03, "truck": 0.02}
    d, k = 0.5, 10
    assert served.answer_kind(dict(plain), plain, k, d) == "plain"
    assert served.answer_kind({c: v + 1e-6 for c, v in plain.items()}, plain, k, d) == "plain"  # batching noise
    assert served.answer_kind({c: (v + d) / (1 + k * d) for c, v in plain.items()}, plain, k, d) == "dpreds"
    assert served.answer_kind({"cat": 1.0, "dog": 0.0, "frog": 0.0, "ship": 0.0, "truck": 0.0}, plain, k, d) == "probation"
    assert served.answer_kind({"dog": 0.9, "cat": 0.1}, plain, k, d) == "other"


def test_photo_clients_are_the_full_size_transforms():
    names = [c.name for c in served.photo_clients()]
    assert {"all", "jpeg30", "png", "downup0.5", "blur1.5", "hflip", "rotate10", "zoom", "noise", "repeat_one",
            "near_dup_bursts"} <= set(names)
    assert not [n for n in names if n.startswith(("class", "pair", "skewed"))]  # 200 photos of 200 classes
    assert "blur0.5" not in names and "translate2" not in names


@needs_data
def test_served_suite_on_cifar10(tmp_path):
    pytest.importorskip("ts")
    out = tmp_path / "out"
    rc = served.main(["--datasets", "cifar10", "--clients", "all,repeat_one", "--queries", str(QUERIES),
                      "--configurations", "shipped", "--calibration-images", "200", "--workdir", str(tmp_path / "w"),
                      "--out-dir", str(out), "--name", "served"])
    assert rc == 0
    result = json.loads((out / "served.json").read_text())
    assert result["complete"]
    d = result["datasets"]["cifar10"]
    assert d["distribution_test"]["shipped"].startswith("on, reference rebuilt on the served path"), d["distribution_test"]
    assert set(d["clients"]) == {"all", "repeat_one"}
    for name, row in d["clients"].items():
        r = row["shipped"]
        for k in ("client", "configuration", "sent", "answered", "refused", "refusal", "counted_flagged_share",
                  "dpreds_share", "probation_answers", "top1_equal_share", "other_answers", "seed"):
            assert k in r, (name, k)
        assert r["other_answers"] == 0, r  # every answer is the unprotected one, DPreds of it, or a probation label
        assert r["counted_flagged_share"] is not None, r  # the metrics counted every answered query
        if r["configuration"] == "shipped":  # every counted row gets DPreds, nothing else does
            assert r["counted_flagged"] == r["dpreds_answers"], r
        assert r["answered"] + (r["refusal"] is not None) <= r["sent"] <= QUERIES
        assert r["top1_equal_share"] == 1.0  # DPreds keep the top-1
    control = d["clients"]["all"]["shipped"]
    assert control["answered"] == QUERIES and not control["refused"] and control["probation_answers"] == 0
    md = (out / "served.md").read_text()
    assert "| all |" in md and "served through TorchServe" in md and "reference rebuilt on the served path" in md
    # the same stream as the in-process suite's `--datasets cifar10` (seed 0, the client's place in the list)
    ds = bs.load_dataset("cifar10")
    assert control["seed"] == [c.name for c in bs.clients_for(ds, 0)].index("all")
