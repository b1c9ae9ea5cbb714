"""Core: gradient representation, DPreds, the refusal rule, SQLite under concurrency, artifacts, config."""

from __future__ import annotations

import multiprocessing as mp
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from guardian_plugin.config import load_config, parse_config
from guardian_plugin.detector import (DetectorSpec, ImageSpec, InputMapping, SubDetector, SubDetectorSpec,
                                      load_detector, save_detector)
from guardian_plugin.errors import ArtifactError, ConfigError
from guardian_plugin.guardian import Guardian, Verdict
from guardian_plugin.ledger import RefusalRule, default_tau, false_refusal_probability, open_ledger
from guardian_plugin.nets import DCGANDiscriminator
from guardian_plugin.responses import DPreds, dpreds
from guardian_plugin.training.data import MNIST_MEAN, MNIST_STD, mnist_splits, normalise, photo_crops, to_float
from guardian_plugin.transform import TransformContext, TransformModel, build_transform

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def digits():
    x, _ = mnist_splits()["test"]
    return to_float(x[:16])


def _transforms(tmp_path):
    d = DCGANDiscriminator(1, 8)
    torch.save(d.state_dict(), tmp_path / "d.pt")
    ctx = TransformContext(1, 28, artifact_dir=str(tmp_path))
    from guardian_plugin.nets import SmallResNet

    victim = SmallResNet(1, 10, 8).eval()
    return {
        "discriminator": build_transform("discriminator", {"weights": "d.pt", "width": 8}, ctx),
        "victim": build_transform("victim", {}, TransformContext(1, 28, victim=victim, victim_mean=MNIST_MEAN,
                                                                 victim_std=MNIST_STD)),
        "identity": build_transform("identity", {}, ctx),
    }


@pytest.mark.parametrize("name", ["discriminator", "victim", "identity"])
def test_representation_bounds_and_per_sample_independence(tmp_path, digits, name):
    t = _transforms(tmp_path)[name]
    g = t(digits)
    assert g.shape == digits.shape and g.dtype == torch.float32
    assert float(g.min()) >= 0.0 and float(g.max()) <= 255.0
    if name != "identity":  # every sample's min-max spans the whole range
        assert torch.allclose(g.flatten(1).min(1).values, torch.zeros(len(g)))
        assert torch.allclose(g.flatten(1).max(1).values, torch.full((len(g),), 255.0))
    # a sample's representation does not depend on the rest of its batch
    other = torch.rand_like(digits)
    mixed = torch.cat([digits[:4], other[4:]])
    g2 = t(mixed)
    assert torch.allclose(g[:4], g2[:4], atol=1e-3)
    alone = t(digits[2:3])
    assert torch.allclose(g[2:3], alone, atol=1e-3)


def test_representation_under_inference_mode(tmp_path, digits):
    """TorchServe runs inference under torch.inference_mode(); the gradient must still be computed."""
    t = _transforms(tmp_path)["discriminator"]
    ref = t(digits)
    with torch.inference_mode():
        g = t(digits)
    assert torch.allclose(ref, g)


def test_transform_params_frozen(tmp_path):
    t = _transforms(tmp_path)["discriminator"]
    assert not any(p.requires_grad for p in t.parameters())
    t.train()
    assert not t.model.training


def test_unknown_transform_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown transformation model 'nope'"):
        build_transform("nope", {}, TransformContext(1, 28))
    with pytest.raises(ConfigError, match="weights"):
        build_transform("torchvision:resnet18", {}, TransformContext(3, 32))


prob_vectors = st.integers(2, 50).flatmap(
    lambda k: arrays(np.float64, k, elements=st.floats(0.0, 1.0, allow_nan=False)).filter(lambda a: a.sum() > 1e-6))


@settings(max_examples=300, deadline=None)
@given(prob_vectors, st.floats(0.0, 10.0, allow_nan=False))
def test_dpreds_keeps_ranking_and_argmax(v, d):
    p = torch.tensor(v / v.sum())
    q = dpreds(p.unsqueeze(0), d)[0]
    assert torch.isclose(q.sum(), torch.tensor(1.0, dtype=q.dtype))
    assert int(q.argmax()) == int(p.argmax())
    # no order is ever inverted; every order above float resolution is kept strictly
    sp, sq = torch.sign(p[:, None] - p[None, :]), torch.sign(q[:, None] - q[None, :])
    top = p.argmax()
    assert bool((sp * sq >= 0).all())
    resolvable = (p[:, None] - p[None, :]).abs() > 1e-12
    assert torch.equal(sp[resolvable], sq[resolvable])
    assert int(q.argmax()) == int(top)
    p32 = p.float()
    assert int(dpreds(p32.unsqueeze(0), d)[0].argmax()) == int(p32.argmax())  # served probabilities are float32
    if d > 0:  # and the distribution is flattened towards uniform
        assert float(q.max()) <= float(p.max()) + 1e-12


def test_dpreds_policy_touches_flagged_rows_only():
    p = torch.softmax(torch.randn(4, 10), 1)
    flagged = torch.tensor([True, False, True, False])
    out = DPreds(0.5)(p, flagged)
    assert torch.equal(out[~flagged], p[~flagged])
    assert torch.allclose(out[flagged], (p[flagged] + 0.5) / 6.0)
    with pytest.raises(ValueError):
        DPreds(-1)


@pytest.mark.parametrize("uri", ["memory://", "sqlite"])
def test_rule_at_exactly_tau_and_rho(tmp_path, uri):
    if uri == "sqlite":
        uri = f"sqlite:///{tmp_path}/l.db"
    led = open_ledger(uri, RefusalRule(tau=4, rho=0.5))
    # 3 queries all flagged: below tau, not refused
    s = led.record("a", 3, 3)
    assert not s.refused
    # 4th query: queries == tau, share 4/4 > 0.5: refused exactly at tau
    s = led.record("a", 1, 1)
    assert s.refused and s.refused_at_query == 4
    # share exactly rho (2/4 = 0.5) at tau: NOT refused (the rule is "> rho")
    s = led.record("b", 4, 2)
    assert not s.refused
    s = led.record("b", 1, 1)  # 3/5 > 0.5
    assert s.refused and s.refused_at_query == 5
    # sticky: diluting with benign queries does not lift the refusal
    s = led.record("b", 100, 0)
    assert s.refused
    # operator unblock lifts it, reset forgets it
    assert not led.set_blocked("b", False).refused
    led.reset("a")
    assert led.get("a").queries == 0 and not led.get("a").refused
    assert led.set_blocked("c", True).denied
    assert {c.client_id for c in led.clients()} == {"b", "c"}


def _hammer(path, n, client):
    led = open_ledger(f"sqlite:///{path}", RefusalRule(tau=10**9, rho=0.5))
    for i in range(n):
        led.record(client, 1, i % 3 == 0)
    led.close()


def test_four_processes_one_sqlite_ledger_exact_counts(tmp_path):
    path = str(tmp_path / "shared.db")
    n = 500
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_hammer, args=(path, n, "shared")) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    s = open_ledger(f"sqlite:///{path}", RefusalRule()).get("shared")
    assert s.queries == 4 * n
    assert s.flagged == 4 * len(range(0, n, 3))


def test_default_tau_follows_the_binomial_bound():
    tau = default_tau(rho=0.5, fpr=0.05, max_false_refusal=1e-6)
    assert false_refusal_probability(tau, 0.5, 0.05) <= 1e-6
    assert false_refusal_probability(tau - 1, 0.5, 0.05) > 1e-6


# ------------------------------------------------------------------------------------ artifacts
def _tiny_artifact(path, threshold=0.0):
    spec = DetectorSpec(format_version=1, image=ImageSpec(channels=1, size=28),
                        input=InputMapping(mean=list(MNIST_MEAN), std=list(MNIST_STD)),
                        subdetectors=[SubDetectorSpec(name="a", transform="identity", arch="small_resnet",
                                                      arch_params={"width": 8}, weights="a.pt", threshold=threshold)])
    torch.manual_seed(0)
    save_detector(str(path), spec, [SubDetector("small_resnet", 1, 28, width=8)])
    return path


def test_artifact_roundtrip_and_guardian(tmp_path, digits):
    art = _tiny_artifact(tmp_path / "art", threshold=-1e9)  # flags everything
    g = Guardian.from_artifact(str(art), rule=RefusalRule(tau=2, rho=0.5))
    x = normalise(digits[:3], MNIST_MEAN, MNIST_STD)
    p = torch.softmax(torch.randn(3, 10), 1)
    r = g.inspect(x, p, ["a", "a", "b"])
    assert r.verdicts == [Verdict.FLAGGED] * 3
    assert torch.allclose(r.probs, dpreds(p, 0.5))
    assert torch.equal(r.probs.argmax(1), p.argmax(1))
    assert g.refused(["a", "b"]) == [True, False]
    r = g.inspect(x, p, ["a", "b", "b"])
    # b crosses the rule (tau 2) at its second query, row 1: answered; its next row, in the same batch,
    # is not, exactly as if each row had been its own request
    assert r.verdicts == [Verdict.REFUSED, Verdict.FLAGGED, Verdict.REFUSED]
    assert r.cut[0] is None and r.cut[1] is None and r.cut[2].status == 403
    assert g.ledger.get("b").queries == 2  # the cut row is not counted


@pytest.mark.parametrize("damage,match", [
    ("missing_yaml", "detector.yaml is missing"),
    ("bad_yaml", "not valid YAML"),
    ("bad_version", "format_version"),
    ("missing_weights", "a.pt is missing"),
    ("corrupt_weights", "a.pt is corrupt"),
    ("missing_field", "subdetectors"),
])
def test_corrupt_artifact_gives_clear_error(tmp_path, damage, match):
    art = _tiny_artifact(tmp_path / "art")
    y = art / "detector.yaml"
    if damage == "missing_yaml":
        y.unlink()
    elif damage == "bad_yaml":
        y.write_text("format_version: [1\n")
    elif damage == "bad_version":
        y.write_text(y.read_text().replace("format_version: 1", "format_version: 99"))
    elif damage == "missing_weights":
        (art / "a.pt").unlink()
    elif damage == "corrupt_weights":
        (art / "a.pt").write_bytes(b"\x00garbage" * 10)
    elif damage == "missing_field":
        y.write_text("format_version: 1\n")
    with pytest.raises(ArtifactError, match=match) as e:
        load_detector(str(art))
    assert str(art) in str(e.value)


def test_config_errors_name_file_and_field(tmp_path):
    p = tmp_path / "guard.yaml"
    p.write_text("detector: det\nrule: {rho: 2}\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(p))
    assert str(p) in str(e.value) and "rule.rho" in str(e.value)
    p.write_text("detector: det\nlegder: memory://\n")
    with pytest.raises(ConfigError, match="legder"):
        load_config(str(p))
    cfg = parse_config({"detector": "det"}, base_dir="/x")
    assert cfg.detector == "/x/det" and cfg.rule.resolve_tau() == default_tau(0.5, 0.05, 1e-6)


def test_photo_groups_are_disjoint_and_real():
    from guardian_plugin.training.data import PHOTO_GROUPS

    names = [n for g in PHOTO_GROUPS.values() for n in g]
    assert len(names) == len(set(names))
    x = photo_crops("evaluate", 20, seed=3)
    assert x.shape == (20, 1, 28, 28) and x.dtype == np.uint8 and x.std() > 5


def test_check_inputs_rejects_pixels_outside_the_image_range(tmp_path, digits):
    """What the detector scores is clamped to [0, 1]: an input whose pixels lie further out is a 400
    before the model runs (issue #25 item 2), 8-bit images normalised and mapped back pass."""
    g = Guardian.from_artifact(str(_tiny_artifact(tmp_path / "art")))
    x = normalise(digits[:2], MNIST_MEAN, MNIST_STD)
    assert g.check_inputs(x) == [None, None]
    m, s = MNIST_MEAN[0], MNIST_STD[0]
    for v in (1.01, -0.01, 1e3, 1e30, -1e30):
        bad = x.clone()
        bad[1, 0, 3, 3] = (v - m) / s
        out = g.check_inputs(bad)
        assert out[0] is None and out[1].status == 400 and out[1].kind == "InputOutOfRange", v
    edge = x.clone()
    edge[0] = (1.0005 - m) / s  # within a quarter grey level of the range: float rounding, accepted
    assert g.check_inputs(edge)[0] is None
