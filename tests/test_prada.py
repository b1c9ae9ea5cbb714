"""The PRADA baseline (guardian_plugin.prada): the published test on streams whose answer is known, its
batch handling, the guard wrapper through the evaluation harness's EvalTarget, and the prada
configuration of the harness and of the benign suite. Real components: the committed MNIST example
victim, real digits of the calibration split, scipy's Shapiro-Wilk."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import yaml
from scipy.stats import shapiro

from guardian_plugin.attacks.target import EvalTarget, QueryRefused
from guardian_plugin.errors import ConfigError
from guardian_plugin.prada import (MIN_DISTANCES, PRADA_REFUSED, Prada, PradaGuard, calibration_data, load_delta,
                                   shapiro_w)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DELTA_FILE = os.path.join(ROOT, "benchmarks", "results", "prada_delta.json")


@pytest.fixture(scope="module")
def calib():
    """MNIST calibration digits (model inputs) and the example victim's probabilities for them."""
    torch.set_num_threads(1)
    x, probs, _, _ = calibration_data("mnist")
    return x, probs


@pytest.fixture(scope="module")
def victim():
    from examples.mnist import serving as ex

    return torch.jit.load(ex.VICTIM_TS, map_location="cpu").eval()


def one_hot(classes, k=10):
    return torch.nn.functional.one_hot(torch.as_tensor(classes), k).float()


def test_algorithm_on_a_hand_computed_stream():
    """Points on a line, one class: d_min, G_c growth and T_c = max(T_c, mean(D_Gc) - std(D_Gc)) by hand."""
    p = Prada(delta=0.5, min_distances=1000)
    pts = torch.tensor([[0.0], [4.0], [1.0], [10.0], [10.5]])
    v = p.observe("c", pts, one_hot([0] * 5))
    assert [r.d_min for r in v] == [None, 4.0, 1.0, 6.0, 0.5]
    st = p.state("c")
    g = st.classes[0]
    # x0 starts G_c (D_Gc = {0}); 4 > T=0 kept -> D_Gc {0,4}: mean 2, std 2, T = 0; 1 > 0 kept -> {0,4,1}:
    # mean 5/3, std 1.70 -> T = max(0, -0.03) = 0; 6 kept -> {0,4,1,6}: mean 2.75, std 2.38 -> T = 0.37;
    # 0.5 > 0.37 kept -> {0,4,1,6,.5}: mean 2.3, std 2.25 -> T stays 0.37 (max)
    d = np.array([0, 4, 1, 6])
    assert g.threshold == pytest.approx(d.mean() - d.std())
    assert g.n == 5 and st.distances == [4.0, 1.0, 6.0, 0.5] and not st.detected
    # another class starts its own G_c: its first query records no distance
    v = p.observe("c", torch.tensor([[100.0]]), one_hot([1]))
    assert v[0].d_min is None and len(st.distances) == 4
    # a query at T_c or closer is not kept
    p.observe("c", torch.tensor([[10.2]]), one_hot([0]))
    assert g.n == 5 and st.distances[-1] == pytest.approx(0.2)


def test_batches_and_the_ring_buffer_give_the_row_by_row_answer(calib):
    x, probs = calib
    x, probs = x[:300], probs[:300]
    for max_kept in (5000, 7):  # 7: the ring buffer overwrites G_c's oldest queries all along
        one = Prada(delta=0.99, max_kept=max_kept)
        rows = [one.observe("c", x[i:i + 1], probs[i:i + 1])[0] for i in range(len(x))]
        many = Prada(delta=0.99, max_kept=max_kept)
        batched = [v for i in range(0, len(x), 64) for v in many.observe("c", x[i:i + 64], probs[i:i + 64])]
        assert [r.d_min is None for r in rows] == [r.d_min is None for r in batched]
        assert np.allclose([r.d_min or 0 for r in rows], [r.d_min or 0 for r in batched], atol=1e-4)
        assert [r.detected for r in rows] == [r.detected for r in batched]
        assert one.state("c").detected_at == many.state("c").detected_at
    assert max(g.n for g in many.state("c").classes.values()) == 7


def test_shapiro_w_needs_the_minimum_and_removes_outliers():
    rng = np.random.default_rng(0)
    normal = rng.normal(5, 1, 500)
    assert shapiro_w(normal) > 0.99
    # one pass: the value beyond 3 standard deviations is dropped, the normal sample kept whole
    assert shapiro_w(np.r_[normal, [1e6]]) == pytest.approx(shapiro(normal).statistic)
    assert shapiro(np.r_[normal, [1e6]]).statistic < 0.1
    assert shapiro_w(np.zeros(200)) == 1.0  # constant D: nothing to test
    p = Prada(delta=0.999)
    st = p.state("c")
    vs = p.observe("c", torch.randn(MIN_DISTANCES + 2, 5), one_hot([0] * (MIN_DISTANCES + 2)))
    # the first query opens G_c; W is computed once |D| > 100, i.e. from the 102nd query on
    assert all(v.w is None for v in vs[:MIN_DISTANCES + 1]) and vs[-1].w is not None
    assert len(st.distances) == MIN_DISTANCES + 1


def test_near_duplicates_are_detected_and_natural_digits_are_not(calib, victim):
    """Known answers: each digit followed by a tiny perturbation of itself (what a perturbation-based
    synthetic-query attack sends) gives two modes of distances, far from normal; the calibration split's
    digits sent once each in a random order are normal enough (the calibrated delta is below their W)."""
    delta = load_delta(DELTA_FILE, "mnist")
    assert 0.9 < delta < 1.0
    x, probs = calib
    g = torch.Generator().manual_seed(1)
    base = x[torch.randperm(len(x), generator=g)[:200]]
    pert = base + 0.01 * torch.randn(base.shape, generator=g)
    stream = torch.stack([base, pert], 1).reshape(-1, *base.shape[1:])
    with torch.no_grad():
        sp = torch.softmax(victim(stream), 1)
    p = Prada(delta)
    for i in range(0, len(stream), 10):
        p.observe("attacker", stream[i:i + 10], sp[i:i + 10])
    st = p.state("attacker")
    assert st.detected and st.w_at_detection < delta and st.detected_at <= 150
    # natural digits: a seeded order other than the calibration's streams
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(123))
    p = Prada(delta)
    for i in range(0, len(x), 10):
        p.observe("benign", x[perm[i:i + 10]], probs[perm[i:i + 10]])
    st = p.state("benign")
    assert not st.detected and st.last_w > delta and len(st.distances) > 900


def test_guard_refuses_through_eval_target_from_the_request_after_detection(calib, victim):
    x, _ = calib
    base = x[:100]
    stream = torch.stack([base, base + 0.01 * torch.randn(base.shape, generator=torch.Generator().manual_seed(0))],
                         1).reshape(-1, *base.shape[1:])
    guard = PradaGuard(Prada(load_delta(DELTA_FILE, "mnist")))
    t = EvalTarget(victim, 10, guard, client_id="attacker")
    answered = 0
    with pytest.raises(QueryRefused) as e:
        for i in range(0, len(stream), 10):
            out = t.query(stream[i:i + 10])
            with torch.no_grad():
                assert torch.equal(out, torch.softmax(victim(stream[i:i + 10]), 1))  # answers unchanged
            answered += 10
    assert e.value.status == 403 and t.stop_status == 403
    st = guard.prada.state("attacker")
    # detected inside a request, which is answered whole; the next request is refused
    assert st.detected_at is not None and answered == t.refused_at == -(-st.detected_at // 10) * 10
    assert t.dpreds_answers == 0 and t.probation_answers == 0 and t.flagged == 0
    assert guard.admit_clients(["attacker", "other"])[0].denial == PRADA_REFUSED
    assert guard.admit_clients(["other"])[0].ok and guard.refused(["attacker", "other"]) == [True, False]


def _quick_cfg(tmp_path, prada: dict, budget: int = 512):
    from guardian_plugin.evaluation.config import parse_eval_config

    quick = os.path.join(ROOT, "benchmarks", "attacks_quick.yaml")
    with open(quick) as f:
        raw = yaml.safe_load(f)
    raw["attacks"] = [{"attack": "dfme", "budget": budget, "params": {"batch_size": 16, "ngf": 8, "clone_steps": 2}}]
    raw["configurations"] = ["prada"]
    raw["guard"]["prada"] = prada
    raw["cache_dir"] = str(tmp_path / "cache")
    return parse_eval_config(raw, quick, os.path.dirname(quick))


def test_config_parsing(tmp_path):
    from guardian_plugin.evaluation.config import EvalConfig

    cfg = _quick_cfg(tmp_path, {"delta_file": "results/prada_delta.json", "dataset": "mnist"})
    assert cfg.guard.prada.delta_file == DELTA_FILE  # relative to the config file
    assert cfg.guard.prada.resolve_delta() == load_delta(DELTA_FILE, "mnist")
    assert _quick_cfg(tmp_path, {"delta": 0.9}).guard.prada.resolve_delta() == 0.9
    with pytest.raises(ConfigError, match="guard.prada.delta"):
        _quick_cfg(tmp_path, {})
    with pytest.raises(ConfigError, match="not both"):
        _quick_cfg(tmp_path, {"delta": 0.9, "delta_file": "x.json", "dataset": "mnist"})
    with pytest.raises(ConfigError, match="dataset"):
        _quick_cfg(tmp_path, {"delta_file": "x.json"})
    with pytest.raises(ConfigError, match="less than or equal to 1"):
        _quick_cfg(tmp_path, {"delta": 1.5})
    missing = _quick_cfg(tmp_path, {"delta_file": str(tmp_path / "none.json"), "dataset": "mnist"})
    with pytest.raises(FileNotFoundError, match="prada calibrate"):
        missing.guard.prada.resolve_delta()
    with pytest.raises(KeyError, match="imagenet"):
        load_delta(DELTA_FILE, "imagenet")
    # the baselines are not among the default configurations (prada needs its delta)
    assert "prada" not in EvalConfig.model_fields["configurations"].default


def test_harness_runs_an_attack_against_prada(tmp_path):
    from guardian_plugin.evaluation.harness import run_evaluation

    n = torch.get_num_threads()
    cfg = _quick_cfg(tmp_path, {"delta": 0.999}, budget=512)  # a delta no attack stream stays above
    cfg.benign_replay, cfg.photo_replay = 0, 0
    res = run_evaluation(cfg, str(tmp_path / "out"), progress=False, command="pytest", log=lambda s: None)
    torch.set_num_threads(n)
    (r,) = res["runs"]
    assert r["configuration"] == "prada" and r["accounting_ok"] and r["refused"] and r["stopped_by"] == "refusal"
    assert r["prada"]["detected_at_query"] > MIN_DISTANCES and r["prada"]["w_at_detection"] < 0.999
    # refused at the batch (16 queries) after the one it was detected in
    assert r["answered_before_refusal"] == -(-r["prada"]["detected_at_query"] // 16) * 16
    assert "dacc" not in r and "fpr" not in res["benign"]["prada"]
    tables = open(tmp_path / "out" / "tables.md").read()
    assert "PRADA (baseline" in tables


def test_benign_suite_prada_configuration():
    from benchmarks import benign_suite as bs

    ds = bs.load_dataset("mnist")
    c = next(c for c in bs.clients_for(ds, 0) if c.name == "near_dup_bursts")
    r = bs.run_client(ds, c, "prada", 400, seed=0)
    ref = r["refusal"]
    assert r["refused"] and ref["mechanism"] == "prada" and ref["status"] == 403
    assert ref["at_query"] == r["answered"] + 1 and ref["prada_w"] < ref["prada_delta"]
    assert r["dpreds_share"] == 0 and r["top1_equal_share"] == 1.0
    md = bs.markdown({"command": "x", "git_commit": "c", "dirty": False, "seed": 0, "quick": True, "seconds": 1.0,
                      "cpus": 2, "complete": True, "configurations": {"prada": None},
                      "datasets": {"mnist": {"split": ds.split, "queries": 400,
                                             "clients": {c.name: {"what": c.what, "prada": r}}}}})
    assert "prada: W" in md
