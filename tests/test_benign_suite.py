"""The benign-traffic suite's machinery (benchmarks/benign_suite.py), on the committed MNIST example at a few
hundred queries: client streams, the guard in process, and the report fields, and the CI subset of the
suite: the ordinary clients the earlier (two-sided) distribution test refused within a few hundred queries
are not refused now. The full suite's figures: docs/refusal-rule.md."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from benchmarks import benign_suite as bs


@pytest.fixture(scope="module")
def mnist():
    return bs.load_dataset("mnist")


def _client(ds, name):
    return next(c for c in bs.clients_for(ds, 0) if c.name == name)


def test_client_streams(mnist):
    names = [c.name for c in bs.clients_for(mnist, 0)]
    assert {"all", "class0", "class9", "skewed", "jpeg30", "png", "downup0.5", "rotate10", "repeat_one",
            "near_dup_bursts"} <= set(names)
    assert not {"hue", "saturation", "hflip"} & set(names)  # no colour, no mirrored digits
    for c in bs.clients_for(mnist, 0):
        a = bs.client_images(mnist, c, 40, seed=3)
        assert a.shape == (40, 1, 28, 28) and a.dtype == np.uint8, c.name
        assert np.array_equal(a, bs.client_images(mnist, c, 40, seed=3)), c.name  # seeded
    idx = {bytes(v.tobytes()): int(y) for v, y in zip(mnist.x, mnist.y)}
    assert {idx[a.tobytes()] for a in bs.client_images(mnist, _client(mnist, "class3"), 200, 0)} == {3}
    one = bs.client_images(mnist, _client(mnist, "repeat_one"), 30, 0)
    assert (one == one[0]).all()
    png = bs.client_images(mnist, _client(mnist, "png"), 30, 0)
    assert all(a.tobytes() in idx for a in png)  # lossless: the stored digits exactly
    jpg = bs.client_images(mnist, _client(mnist, "jpeg30"), 30, 0)
    assert not all(a.tobytes() in idx for a in jpg)
    bursts = bs.client_images(mnist, _client(mnist, "near_dup_bursts"), 30, 0).astype(int)
    assert np.abs(bursts[1] - bursts[0]).mean() < 3 and not np.array_equal(bursts[1], bursts[0])


def test_held_out_digits_are_never_refused_and_the_report_has_its_fields(mnist, tmp_path):
    c = _client(mnist, "all")
    shipped = bs.run_client(mnist, c, "shipped", 400, seed=0)
    assert shipped["answered"] == 400 and not shipped["refused"] and shipped["refusal"] is None
    assert shipped["probation_answers"] == 0 and shipped["top1_equal_share"] == 1.0
    assert shipped["dpreds_share"] <= 0.05
    depth = bs.run_client(mnist, c, "defense_in_depth", 400, seed=0)
    assert not depth["refused"]
    assert depth["probation_answers"] >= 200 and depth["last_probation_query"] >= 200
    assert depth["top1_equal_share"] == 1.0  # a probation answer is the unprotected top-1
    result = {"command": "x", "git_commit": "c", "dirty": False, "seed": 0, "quick": True, "seconds": 1.0,
              "cpus": 2, "complete": True,
              "datasets": {"mnist": {"split": mnist.split, "queries": 400,
                                     "clients": {"all": {"what": c.what, "shipped": shipped, "defense_in_depth": depth}}}}}
    md = bs.markdown(result)
    assert "| all |" in md and "never" in md and "shipped: refused at" in md
    json.dumps(result)
    for k in ("client", "configuration", "sent", "answered", "refused", "refusal", "detector_flagged_share",
              "first_suspect_query", "suspect_answers", "dpreds_share", "probation_answers", "top1_equal_share"):
        assert k in shipped


def test_generators_are_refused_and_the_mechanism_is_named(mnist):
    from examples.mnist import serving as ex

    def generator(bn_eval):
        x = ex.decode_pngs(ex.generator_images(400, seed=0, bn_eval=bn_eval))[:, None]
        return dataclasses.replace(mnist, x=x, y=np.zeros(len(x), dtype=np.int64))

    c = bs.Client("generator", "DFME generator images")
    r = bs.run_client(generator(False), c, "shipped", 400, seed=0)  # flagged per sample: the rule at tau
    assert r["refused"] and r["refusal"]["at_query"] <= 30 and r["refusal"]["status"] == 403
    assert r["refusal"]["mechanism"] in ("rule", "window") and not r["refusal"]["via_suspicion"]
    r = bs.run_client(generator(True), c, "shipped", 400, seed=0)  # unflagged: the distribution test's suspicion
    assert r["refused"] and r["first_suspect_query"] == 201
    assert r["refusal"]["via_suspicion"] and r["refusal"]["at_query"] > 200


# every client the two-sided KL test refused at 241-261 on MNIST (benign_suite_quick_final.md), and a mix
@pytest.mark.parametrize("name", ["class3", "class9", "jpeg50", "downup0.5", "noise", "repeat_one", "near_dup_bursts"])
def test_ci_subset_ordinary_clients_are_not_refused(mnist, name):
    r = bs.run_client(mnist, _client(mnist, name), "shipped", 800, seed=0)
    assert r["answered"] == 800 and not r["refused"], r["refusal"]
    assert r["first_suspect_query"] is None and r["top1_equal_share"] == 1.0
