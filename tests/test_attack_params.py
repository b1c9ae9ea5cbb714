"""Attack parameters are declared once per attack, typed and checked: a misspelt key or a wrong type is an
error naming the attack, the field and the known keys, in Python and when an evaluation config loads;
the registry gives each attack its name and lists its parameters; docs/attacks.md's tables are the
declarations. The four query targets live in one module."""

from __future__ import annotations

import os

import pytest
import torch
import yaml

from guardian_plugin.attacks import ATTACKS, AttackParamError, AttackParams, build_attack
from guardian_plugin.attacks.base import Attack, param_info
from guardian_plugin.attacks.target import InProcessTarget
from guardian_plugin.config import ConfigError
from guardian_plugin.evaluation.config import parse_eval_config
from guardian_plugin.nets import SmallResNet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ATTACKS.names()


def test_the_seven_attacks_are_registered_under_their_own_names():
    assert set(NAMES) >= {"dfme", "maze", "dast", "dfms", "disguide", "dual_students", "quda"}
    for name in NAMES:
        assert ATTACKS.get(name).name == name


def test_the_bases_are_abstract_and_every_registered_attack_is_concrete():
    """Attack.step and GeneratorAttack's builders are abstract methods: a subclass that forgets one
    fails when it is built, naming the method, not at its first step."""
    import inspect

    from guardian_plugin.attacks.generator import GeneratorAttack

    assert {"step"} <= Attack.__abstractmethods__
    assert {"build_generator", "build_generator_optimizer", "initial_clone_lr", "build_clone_optimizer",
            "to_input"} <= GeneratorAttack.__abstractmethods__
    assert [n for n in NAMES if inspect.isabstract(ATTACKS.get(n))] == []


def test_an_attack_class_may_not_name_itself():
    with pytest.raises(TypeError, match="registry gives an attack its name"):
        @ATTACKS.register("self-named")
        class SelfNamed(Attack):
            name = "other"
    assert "self-named" not in ATTACKS


@pytest.mark.parametrize("name", NAMES)
def test_params_are_listed_with_types_and_defaults(name):
    info = {r["name"]: r for r in ATTACKS.params(name)}
    # what the harness passes every attack is declared once, in the common base
    common = {r["name"]: r for r in param_info(AttackParams)}
    assert set(common) == {"mean", "std", "num_classes", "cache_dir", "memory", "refusal_epochs", "lr_refusal"}
    for k, r in common.items():
        assert info[k] == r and r["common"]
    assert info["batch_size"]["type"] == "int" and not info["batch_size"]["common"]
    assert all(r["description"] for r in info.values()), [k for k, r in info.items() if not r["description"]]
    # the defaults are what the attack builds with
    cfg = ATTACKS.check(name, {})
    assert all(getattr(cfg, k) == r["default"] for k, r in info.items())


def test_published_defaults():
    d = {n: {r["name"]: r["default"] for r in ATTACKS.params(n)} for n in NAMES}
    assert (d["dfme"]["nz"], d["dfme"]["batch_size"], d["dfme"]["m"], d["dfme"]["clone_steps"]) == (256, 256, 1, 5)
    assert (d["maze"]["nz"], d["maze"]["batch_size"], d["maze"]["m"], d["maze"]["replay_steps"]) == (100, 128, 10, 10)
    assert (d["dast"]["batch_size"], d["dast"]["alpha"], d["dast"]["lr"]) == (500, 0.2, 1e-4)
    assert (d["dfms"]["balance_weight"], d["dfms"]["lr_g"], d["disguide"]["lr_s"]) == (500.0, 2e-4, 0.03)
    assert (d["dual_students"]["student_steps"], d["quda"]["candidates"], d["quda"]["lr_s"]) == (5, 4, 0.05)
    assert d["dfme"]["memory"] == 20000 and d["dfme"]["refusal_epochs"] == 20


@pytest.mark.parametrize("name", NAMES)
def test_a_misspelt_key_is_an_error_naming_the_known_keys(name):
    with pytest.raises(AttackParamError) as e:
        ATTACKS.check(name, {"batchsize": 16})
    msg = str(e.value)
    assert f"attack {name!r}" in msg and "'batchsize'" in msg and "did you mean 'batch_size'" in msg
    for k in ("batch_size", "mean", "std", "cache_dir"):
        assert k in msg.split("known:")[1]
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize("name", NAMES)
def test_a_wrong_type_is_an_error_naming_the_field(name):
    with pytest.raises(AttackParamError, match=rf"attack {name!r}: bad parameter batch_size: .*integer.*'many'"):
        ATTACKS.check(name, {"batch_size": "many"})
    with pytest.raises(AttackParamError, match="mean"):
        ATTACKS.check(name, {"mean": "grey"})


def test_values_are_coerced_as_yaml_writes_them():
    # PyYAML reads 1e-4 as a string; it was float("1e-4") before and stays 1e-4
    cfg = ATTACKS.check("dfme", {"lr_g": "1e-4", "batch_size": 16.0, "lr_milestones": []})
    assert cfg.lr_g == 1e-4 and cfg.batch_size == 16 and cfg.lr_milestones == []
    with pytest.raises(AttackParamError, match="batch_size"):
        ATTACKS.check("dfme", {"batch_size": 16.5})
    with pytest.raises(AttackParamError, match="clone_optimizer"):
        ATTACKS.check("dfme", {"clone_optimizer": "rmsprop"})


@pytest.mark.parametrize("name", NAMES)
def test_the_attack_itself_refuses_a_misspelt_key_before_doing_anything(name):
    class Silent(InProcessTarget):
        def query(self, x):  # pragma: no cover - must never be reached
            raise AssertionError("queried")

    with pytest.raises(AttackParamError, match="unknown parameter 'ngff'"):
        build_attack(name, Silent(SmallResNet(1, 10, width=4, blocks=1), 10), SmallResNet(1, 10, width=4, blocks=1),
                     budget=10, image_shape=(1, 28, 28), progress=False, ngff=8)


def test_the_typed_values_are_what_the_attack_uses(tmp_path):
    victim = SmallResNet(1, 10, width=4, blocks=1)
    a = build_attack("dfme", InProcessTarget(victim, 10), SmallResNet(1, 10, width=4, blocks=1), budget=100,
                     image_shape=(1, 28, 28), progress=False, batch_size="16", ngf=8, lr_milestones=[0.5],
                     clone_optimizer="adam", memory=50)
    assert a.batch == 16 and a.memory.capacity == 50 and a.milestones == [50]
    assert isinstance(a.opt_s, torch.optim.Adam) and a.lr_s == 1e-3
    assert a.params == {"batch_size": "16", "ngf": 8, "lr_milestones": [0.5], "clone_optimizer": "adam"}


def _quick_raw():
    with open(os.path.join(ROOT, "benchmarks", "attacks_quick.yaml")) as f:
        return yaml.safe_load(f)


def test_a_config_with_a_misspelt_key_fails_at_load_naming_file_and_field():
    raw = _quick_raw()
    raw["attacks"][1]["params"]["replay_step"] = 2  # maze
    with pytest.raises(ConfigError) as e:
        parse_eval_config(raw, "cfg.yaml")
    msg = str(e.value)
    assert msg.startswith("cfg.yaml: attacks:") and "attacks[1].params (id 'maze')" in msg
    assert "'replay_step' (did you mean 'replay_steps'?)" in msg and "known:" in msg


def test_a_config_with_a_wrong_type_or_an_unknown_attack_fails_at_load():
    raw = _quick_raw()
    raw["attacks"][0]["params"]["ngf"] = "eight"
    with pytest.raises(ConfigError, match=r"attacks\[0\]\.params \(id 'dfme'\): attack 'dfme': bad parameter ngf"):
        parse_eval_config(raw, "cfg.yaml")
    raw = _quick_raw()
    raw["attacks"][0]["attack"] = "dfmee"
    with pytest.raises(ConfigError, match=r"attacks\[0\]\.attack: unknown attack 'dfmee'"):
        parse_eval_config(raw, "cfg.yaml")


def test_a_config_is_checked_with_what_the_harness_adds():
    """DaST needs two images per class branch: checked with the victim's classes, as the run would be."""
    raw = _quick_raw()
    raw["victim"]["num_classes"] = 2
    raw["attacks"][2]["params"]["batch_size"] = 4
    parse_eval_config(raw, "cfg.yaml")  # 4 >= 2 x 2 classes
    raw["victim"]["num_classes"] = 10
    with pytest.raises(ConfigError, match="at least 2 x num_classes"):
        parse_eval_config(raw, "cfg.yaml")


def test_every_shipped_config_loads():
    from guardian_plugin.evaluation.config import load_eval_config

    for f in sorted(os.listdir(os.path.join(ROOT, "benchmarks"))):
        if f.endswith(".yaml") and ("attack" in f):
            assert load_eval_config(os.path.join(ROOT, "benchmarks", f)).attacks


def test_docs_list_every_attacks_parameters():
    from guardian_plugin.attacks.docs import DOC, render

    with open(DOC) as f:
        text = f.read()
    assert render(text) == text, "docs/attacks.md is out of date: run python -m guardian_plugin.attacks.docs"
    for name in NAMES:
        assert f"`{name}` (" in text
        for r in ATTACKS.params(name):
            assert f"| `{r['name']}` |" in text


def test_common_params_are_declared_once():
    for name in NAMES:
        params = ATTACKS.get(name).Params
        assert issubclass(params, AttackParams)
        for k in AttackParams.model_fields:
            owners = [m for m in params.__mro__ if k in getattr(m, "__annotations__", {})]
            assert owners == [AttackParams], (name, k, owners)


def test_the_four_query_targets_live_together():
    import guardian_plugin.attacks.target as t
    from guardian_plugin.bento import BentoTarget as ServedBentoTarget

    for cls in (t.InProcessTarget, t.EvalTarget, t.TorchServeTarget, t.BentoTarget):
        assert issubclass(cls, t.QueryTarget) and cls.__module__ == t.__name__
    assert issubclass(ServedBentoTarget, t.BentoTarget)
