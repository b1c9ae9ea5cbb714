"""Every attack runs a few iterations against a tiny victim; the target's query count equals the
attack's own count exactly, in soft- and hard-label modes, under a budget and under refusal."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from attack_fixtures import MEAN, STD, one_torch_thread, tiny_victim
from hypothesis import given, settings
from hypothesis import strategies as st

from guardian_plugin.attacks import ATTACKS, build_attack
from guardian_plugin.attacks.aware import build_aware_attack, invert_dpreds
from guardian_plugin.attacks.base import ReplayBuffer, _import_all
from guardian_plugin.attacks.common import shapes_proxy
from guardian_plugin.attacks.target import InProcessTarget, QueryRefused, QueryTarget
from guardian_plugin.nets import SmallResNet
from guardian_plugin.responses import dpreds

_import_all()
TINY = {  # a few iterations each, tiny networks
    "dfme": dict(batch_size=16, ngf=8, clone_steps=2),
    "maze": dict(batch_size=8, ngf=8, m=2, clone_steps=2, replay_steps=2),
    "dast": dict(batch_size=20, ngf=8),
    "dfms": dict(batch_size=16, gan_steps=3, gan_width=8, proxy_images=32, proxy="shapes"),
    "disguide": dict(batch_size=16, ngf=8),
    "dual_students": dict(batch_size=16, ngf=8, student_steps=2),
    "quda": dict(batch_size=16, candidates=2, gan_steps=3, gan_width=8, proxy_images=32, proxy="shapes"),
}
CASES = [(name, mode) for name in sorted(TINY) for mode in ATTACKS.get(name).label_modes]


class RecordingTarget(InProcessTarget):
    """Counts like InProcessTarget and keeps every answered batch; refuses after ``refuse_after``."""

    def __init__(self, victim, refuse_after=None):
        super().__init__(victim, 10)
        self.refuse_after = refuse_after
        self.sent = []
        self.attempts_after_refusal = 0

    def query(self, x):
        if self.refuse_after is not None and self.queries >= self.refuse_after:
            self.attempts_after_refusal += 1
            if self.refused_at is None:
                self.refused_at = self.queries
            raise QueryRefused("test")
        self.sent.append(x.detach().clone())
        return super().query(x)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def victim():
    return tiny_victim()


def _attack(name, target, mode, budget, tmp_path, seed=0, **extra):
    torch.manual_seed(seed)
    clone = SmallResNet(1, 10, width=4, blocks=1)
    params = {**TINY[name], "mean": MEAN, "std": STD, "cache_dir": str(tmp_path), **extra}
    return build_attack(name, target, clone, budget=budget, image_shape=(1, 28, 28), label_mode=mode, seed=seed,
                        evaluate=lambda m: 0.0, eval_every=100, progress=False, **params)


def test_every_attack_of_the_paper_is_registered():
    assert {"dfme", "maze", "dast", "dfms", "disguide", "dual_students", "quda"} <= set(ATTACKS.names())
    assert ATTACKS.get("dfms").label_modes[0] == "hard"  # DFMS-HL is hard-label by default
    for name in ("dast", "dfms", "disguide", "dual_students", "quda"):
        assert "hard" in ATTACKS.get(name).label_modes


@pytest.mark.parametrize("name,mode", CASES)
def test_attack_runs_and_accounts_every_query(name, mode, victim, tmp_path):
    target = RecordingTarget(victim)
    a = _attack(name, target, mode, 300, tmp_path)
    before = [p.detach().clone() for p in a.clone.parameters()]
    res = a.run()
    assert res.queries == a.queries == target.queries == sum(len(x) for x in target.sent)
    assert 0 < res.queries <= 300
    assert res.history and res.history[-1]["queries"] == res.queries
    assert any(not torch.equal(p0, p) for p0, p in zip(before, a.clone.parameters())), "the clone never trained"
    # every answered row is in the attack's memory; hard-label attacks only ever see one-hot answers
    assert len(a.memory) == res.queries
    y = a.memory.y[: len(a.memory)]
    if mode == "hard":
        assert torch.equal(y.sum(1), torch.ones(len(y))) and set(y.unique().tolist()) <= {0.0, 1.0}
    else:
        assert torch.allclose(y.sum(1), torch.ones(len(y)), atol=1e-5) and (y.max(1).values < 1).all()


@pytest.mark.parametrize("name", sorted(TINY))
def test_refused_attack_stops_and_trains_on_what_it_has(name, victim, tmp_path):
    target = RecordingTarget(victim, refuse_after=40)
    a = _attack(name, target, ATTACKS.get(name).label_modes[0], 10_000, tmp_path)
    res = a.run()
    assert res.refused_at == target.refused_at == target.queries == a.queries >= 40
    assert target.attempts_after_refusal == 1  # one refused request, then no more
    assert len(a.memory) == a.queries


def test_dast_batch_too_small_for_its_class_branches_is_a_clear_error(victim, tmp_path):
    with pytest.raises(ValueError, match="at least 2 x num_classes"):
        _attack("dast", RecordingTarget(victim), "soft", 300, tmp_path, batch_size=19)


def test_budget_never_exceeded_with_odd_budget(victim, tmp_path):
    target = RecordingTarget(victim)
    res = _attack("dfme", target, "soft", 101, tmp_path).run()  # batch 16: iterations of 48 queries
    assert res.queries == target.queries <= 101


def test_seeds_reproduce(victim, tmp_path):
    sent = []
    for seed in (3, 3, 4):
        t = RecordingTarget(victim)
        _attack("dual_students", t, "soft", 160, tmp_path, seed=seed).run()
        sent.append(torch.cat([x.flatten() for x in t.sent]))
    assert torch.equal(sent[0], sent[1]) and not torch.equal(sent[0], sent[2])


def test_unsupported_label_mode_is_refused(victim, tmp_path):
    with pytest.raises(ValueError, match="label modes"):
        _attack("maze", RecordingTarget(victim), "hard", 100, tmp_path)


def test_replay_buffer_keeps_a_uniform_reservoir():
    buf = ReplayBuffer(50, seed=0)
    for i in range(20):
        buf.add(torch.full((10, 1), float(i)), torch.zeros(10, 2))
    assert len(buf) == 50 and buf.seen == 200
    vals = buf.x[:, 0]
    assert vals.min() < 5 and vals.max() > 15  # early and late rows both survive


def test_shapes_proxy_is_images_in_range():
    x = shapes_proxy(8, 28, 1, seed=0)
    assert x.shape == (8, 1, 28, 28) and 0 <= float(x.min()) and float(x.max()) <= 1
    assert float(x.std()) > 0.01


# ----------------------------------------------------------------------------- defense-aware
@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0.0, 1.0), min_size=3, max_size=12), st.floats(0.001, 5.0))
def test_dpreds_inverter_recovers_probabilities_with_a_zero_entry(raw, d):
    p = torch.tensor([0.0] + raw, dtype=torch.float64)
    if p.sum() <= 1e-6:
        return
    p = (p / p.sum()).unsqueeze(0)
    rec = invert_dpreds(dpreds(p, d))
    assert torch.allclose(rec, p, atol=1e-6)


def test_dpreds_inverter_leaves_plain_answers_alone():
    p = torch.softmax(torch.randn(32, 10) * 8, 1)
    p = p / p.sum(1, keepdim=True)
    assert torch.allclose(invert_dpreds(p), p, atol=1e-4)
    # and on a confident victim's DPreds answers it is far closer to the truth than the answer itself
    q = dpreds(p, 0.5)
    assert (invert_dpreds(q) - p).abs().max() < 0.05 < (q - p).abs().max()


def test_dpreds_inverter_floors_at_the_answer_resolution():
    """A confident float32 victim: DPreds rounds away every probability under ~1e-7 of the top one. The
    inverter keeps what is resolved (gaps under ~10 come back within 0.1) and puts what is not at the
    resolution floor (a logit gap of ~16), not at float32's tiny (-87), which would swamp a logit loss."""
    from guardian_plugin.attacks.base import recover_logits

    logits = torch.tensor([[12.0, 9.0, 6.0, 3.0, 0.0, -10.0, -20.0, -30.0, -40.0, -50.0]])
    p = torch.softmax(logits, 1)
    rec = recover_logits(invert_dpreds(dpreds(p, 0.5)))
    truth = recover_logits(p)
    gaps = rec[0, 0] - rec[0]
    assert torch.allclose(gaps[:4], (truth[0, 0] - truth[0])[:4], atol=0.1)
    assert 12 < gaps[5:].min() and gaps.max() < 20  # unresolved classes sit at the floor, not at 99
    assert rec.argmax(1).item() == 0


class FlagAllGuardian:
    """Stands in for a Guardian whose detector flags everything (rule: tau=10, rho=0.5), with the
    interface EvalTarget uses (admit_clients, then inspect on the admissions)."""

    def __init__(self):
        self.counts = {}

    def refused(self, ids):
        return [self.counts.get(c, 0) >= 10 for c in ids]

    def admit_clients(self, ids):
        from guardian_plugin.responses import REFUSED, Admission

        return [Admission(denial=REFUSED) if r else Admission(client=c) for c, r in zip(ids, self.refused(ids))]

    def inspect(self, x, probs, clients, refused=None):
        from guardian_plugin.guardian import InspectResult, Verdict

        ids = [getattr(c, "client", c) for c in clients]
        for c in ids:
            self.counts[c] = self.counts.get(c, 0) + 1
        n = len(ids)
        return InspectResult(dpreds(probs, 0.5), [Verdict.FLAGGED] * n, deceived=[True] * n, detected=[True] * n,
                             probation=[False] * n)


def _aware(strategies, target, budget, tmp_path, **extra):
    torch.manual_seed(0)
    params = {**TINY["dfme"], "mean": MEAN, "std": STD, **extra}
    return build_aware_attack("dfme", strategies, target, SmallResNet(1, 10, width=4, blocks=1), budget=budget,
                              image_shape=(1, 28, 28), seed=0, evaluate=lambda m: 0.0, progress=False, **params)


def test_rotating_ids_keeps_getting_answers(victim, tmp_path):
    from guardian_plugin.attacks.target import EvalTarget

    t = EvalTarget(victim, 10, guardian=FlagAllGuardian(), client_id="a", mean=MEAN, std=STD)
    a = _aware({"rotate_ids": {"max_ids": 100}}, t, 480, tmp_path)
    res = a.run()
    assert res.queries == t.queries == 480
    assert t.identities == a.identities > 1 and res.extra["identity_refusals"] == a.identities - 1
    assert t.refused_at == 32  # the first id: its first request (DFME's (m+1) x 16 ZO batch) crossed tau


def test_rotation_stops_at_max_ids(victim, tmp_path):
    from guardian_plugin.attacks.target import EvalTarget

    t = EvalTarget(victim, 10, guardian=FlagAllGuardian(), client_id="a", mean=MEAN, std=STD)
    res = _aware({"rotate_ids": {"max_ids": 3}}, t, 10_000, tmp_path).run()
    assert t.identities == 3 and res.refused_at == res.queries == t.queries


def test_mixing_real_images_counts_them_as_queries(victim, tmp_path):
    t = RecordingTarget(victim)
    a = _aware({"mix_real": {"rho": 0.5, "margin": 0.1, "pool": 64}}, t, 480, tmp_path)  # photo crops
    res = a.run()
    assert res.queries == t.queries <= 480
    # f_s = 1, f_r = 0.1, t = 0.4: two photos per synthetic query
    assert a.real_sent == 2 * (res.queries - a.real_sent)
    # expected flagged share if every synthetic and 10% of photos were flagged stays under rho
    n_s = res.queries - a.real_sent
    assert (n_s + 0.1 * a.real_sent) / res.queries < 0.5


def test_postprocessed_queries_are_what_the_clone_trains_on(victim, tmp_path):
    t = RecordingTarget(victim)
    a = _aware({"postprocess": {"blur": [1.0, 1.0], "jpeg": [50, 50]}}, t, 96, tmp_path)
    a.run()
    sent = torch.cat(t.sent)
    assert torch.allclose(a.memory.x[: len(a.memory)], sent)
    # sent images are 8-bit JPEG round trips: pixel values sit on the 1/255 grid
    pix = (sent * STD[0] + MEAN[0]) * 255
    assert torch.allclose(pix, pix.round(), atol=1e-3)


def test_unknown_strategy_is_an_error(victim, tmp_path):
    with pytest.raises(ValueError, match="unknown defense-aware"):
        _aware({"teleport": {}}, RecordingTarget(victim), 96, tmp_path)


def test_target_interface_is_what_attacks_use():
    assert issubclass(InProcessTarget, QueryTarget)
    assert np.isclose(float(dpreds(torch.tensor([[1.0, 0.0]]), 0.5).min()), 0.25)


@pytest.mark.parametrize("name", ["dfme", "maze", "disguide", "dual_students"])
def test_tanh_generators_reach_the_whole_pixel_range_in_pixels_mode(name, victim, tmp_path):
    ranges = {}
    for output in ("normalised", "pixels"):
        t = RecordingTarget(victim)
        _attack(name, t, "soft", 100, tmp_path, output=output).run()
        pix = torch.cat(t.sent) * STD[0] + MEAN[0]
        ranges[output] = (float(pix.min()), float(pix.max()))
    # normalised: [-1, 1] in MNIST-normalised units is at most 0.44 in pixels; pixels mode spans [0, 1]
    assert ranges["normalised"][1] <= MEAN[0] + STD[0] + 1e-5
    assert ranges["pixels"][0] >= -1e-5 and ranges["pixels"][1] <= 1 + 1e-5 and ranges["pixels"][1] > 0.6
    with pytest.raises(ValueError, match="generator output"):
        _attack(name, RecordingTarget(victim), "soft", 100, tmp_path, output="bytes")


def test_proxy_gan_cache_never_changes_the_callers_random_stream(tmp_path):
    """Training the proxy GAN (a cache miss) and loading it (a hit) leave the attack's random stream in
    the same state, and a hit returns the weights the miss trained."""
    from guardian_plugin.attacks.common import pretrain_proxy_gan

    kw = dict(width=8, steps=3, batch=8, n_images=32, seed=5, cache_dir=str(tmp_path))
    torch.manual_seed(123)
    g1, _, _ = pretrain_proxy_gan("shapes", 28, 1, **kw)   # miss: trains and caches
    after_miss = torch.rand(3)
    torch.manual_seed(123)
    g2, _, _ = pretrain_proxy_gan("shapes", 28, 1, **kw)   # hit
    after_hit = torch.rand(3)
    assert torch.equal(after_miss, after_hit)
    assert all(torch.equal(a, b) for a, b in zip(g1.state_dict().values(), g2.state_dict().values()))


def test_dfme_replay_steps_train_the_clone_without_queries(victim, tmp_path):
    """DFME's replay_steps (default 0, as published) add clone steps on answered queries: the same queries
    are sent (same seed, same count), the clone ends elsewhere."""
    runs = []
    for replay in (0, 3):
        target = RecordingTarget(victim)
        a = _attack("dfme", target, "soft", 200, tmp_path, replay_steps=replay)
        res = a.run()
        assert res.queries == target.queries == a.queries
        runs.append((torch.cat([x.flatten() for x in target.sent]),
                     torch.cat([p.flatten() for p in a.clone.state_dict().values() if p.is_floating_point()])))
    assert runs[0][0].shape == runs[1][0].shape
    assert not torch.equal(runs[0][1], runs[1][1])
    with pytest.raises(Exception, match="replay_steps"):
        _attack("dfme", RecordingTarget(victim), "soft", 200, tmp_path, replay_steps=-1)
