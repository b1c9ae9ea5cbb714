"""The CIFAR-10 example (the paper's own setting; its data: tests/test_cifar10_data.py). Its configs
parse and agree with its victim, the victim trainer runs on 3 x 32 x 32 images (a fresh CIFAR ResNet
on stand-in images, so this needs no data), and every attack of its benchmark config runs against that
victim, counting queries exactly, for a few dozen queries (with a small clone: the config's ResNet-18
clone is built and trained one step on its own, as a whole attack with it takes minutes on CPU)."""

from __future__ import annotations

import json
import os

import numpy as np
import torch
import yaml
from test_attacks import TINY as ATTACK_TINY
from test_cifar10_data import needs_data

from examples.cifar10.train_victim import VICTIM, train_victim
from guardian_plugin.evaluation.config import load_eval_config, parse_eval_config
from guardian_plugin.evaluation.harness import run_evaluation
from guardian_plugin.nets import build_classifier
from guardian_plugin.training.config import load_train_config
from guardian_plugin.training.common import accuracy
from guardian_plugin.training.data import cifar10_split, normalise, photo_crops, to_float
from guardian_plugin.training.victim import save_victim

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ART = os.path.join(ROOT, "examples", "cifar10", "artifacts")
ATTACKS_CFG = os.path.join(ROOT, "benchmarks", "attacks_cifar10.yaml")
DETECTOR_CFG = os.path.join(ROOT, "examples", "cifar10", "detector-config.yaml")
# test_attacks' few iterations each, with the photo proxy (3-channel crops) for DFMS and QUDA
TINY = {name: {**params, **({"proxy": "photos"} if "proxy" in params else {})} for name, params in ATTACK_TINY.items()}


def test_configs_parse_and_agree_with_the_victim():
    cfg = load_eval_config(ATTACKS_CFG)
    v = cfg.victim
    assert (v.arch, v.arch_params, v.channels, v.size) == (VICTIM["arch"], VICTIM["arch_params"], 3, 32)
    assert v.mean == VICTIM["mean"] and v.std == VICTIM["std"]
    assert cfg.test_data == "cifar10:test"
    assert {a.attack for a in cfg.attacks} >= set(TINY)
    tcfg, _ = load_train_config(DETECTOR_CFG)
    assert (tcfg.victim.arch, tcfg.victim.arch_params) == (VICTIM["arch"], VICTIM["arch_params"])
    assert (tcfg.channels, tcfg.size, list(tcfg.mean), list(tcfg.std)) == (3, 32, VICTIM["mean"], VICTIM["std"])
    assert set(tcfg.sources) == {"dfme", "gan", "diffusion"}
    splits = {g: [e.split for e in getattr(tcfg.real, g) if e.kind == "cifar10"] for g in ("train", "calibrate", "evaluate")}
    assert splits == {"train": ["detector_train"], "calibrate": ["calibrate"], "evaluate": ["test"]}


@needs_data
def test_committed_victim_loads_and_scores_what_it_says():
    with open(os.path.join(ART, "victim.json")) as f:
        info = json.load(f)
    assert (info["arch"], info["mean"], info["std"]) == (VICTIM["arch"], VICTIM["mean"], VICTIM["std"])
    assert info["test_accuracy"] == info["history"][-1]["test_accuracy"] >= 0.88
    m = build_classifier(info["arch"])
    m.load_state_dict(torch.load(os.path.join(ART, "victim.pt"), map_location="cpu", weights_only=True))
    scripted = torch.jit.load(os.path.join(ART, "victim.torchscript.pt"), map_location="cpu")
    x, y = cifar10_split("test", 500)   # 50 per class: within 5 points of the whole split's figure
    x = normalise(to_float(x), VICTIM["mean"], VICTIM["std"])
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert abs(accuracy(m, x, torch.from_numpy(y)) - info["test_accuracy"]) < 0.05
        with torch.no_grad():
            assert torch.allclose(scripted(x[:8]), m.eval()(x[:8]), atol=1e-4)
    finally:
        torch.set_num_threads(n)


def test_cifar_stem_keeps_32x32_resolution():
    cfg = load_eval_config(ATTACKS_CFG)
    m = build_classifier(cfg.clone.arch, in_channels=3, num_classes=10, **cfg.clone.arch_params)
    assert m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1) and isinstance(m.maxpool, torch.nn.Identity)
    out = m(torch.zeros(2, 3, 32, 32))
    assert out.shape == (2, 10)
    out.sum().backward()  # the clone trains: gradients reach the stem
    assert m.conv1.weight.grad is not None


def test_victim_and_every_attack_run_on_3x32x32(tmp_path):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # stand-in images: photo crops with arbitrary labels (the trainer's code path, not its accuracy)
        x = photo_crops("train", 96, size=32, channels=3, seed=0)
        y = np.arange(96, dtype=np.int64) % 10
        model, hist = train_victim(x[:64], y[:64], x[64:], y[64:], pretrained=False, epochs=1, seed=0,
                                   device="cpu", batch_size=32, progress=False)
        assert [h["epoch"] for h in hist] == [0, 1]
        save_victim(model, str(tmp_path / "victim"), {**VICTIM, "history": hist}, (3, 32, 32))
        assert os.path.exists(tmp_path / "victim" / "victim.torchscript.pt")
        torch.save({"x": torch.from_numpy(x[64:]), "y": torch.from_numpy(y[64:])}, tmp_path / "test.pt")

        raw = yaml.safe_load(open(ATTACKS_CFG))
        raw.update(device="cpu", threads=1, seeds=[0], test_data=f"file:{tmp_path / 'test.pt'}", eval_points=1,
                   configurations=["no_defense", "dpreds_only"], cache_dir=str(tmp_path / "cache"))
        raw["victim"]["weights"] = str(tmp_path / "victim" / "victim.pt")
        raw["guard"].update(detector=None, raw_detector=None)
        # the ResNet-18 clone takes minutes on CPU here (test_cifar_stem_keeps_32x32_resolution builds it)
        raw["clone"] = {"arch": "small_resnet", "arch_params": {"width": 4, "blocks": 1}}
        raw["attacks"] = [{**a, "budget": 48, "params": {**a.get("params", {}), **TINY[a["attack"]]}}
                          for a in raw["attacks"] if not a.get("aware")]
        cfg = parse_eval_config(raw, ATTACKS_CFG, os.path.dirname(ATTACKS_CFG))
        res = run_evaluation(cfg, str(tmp_path / "out"), configurations=["no_defense"], progress=False,
                             command="pytest", log=lambda s: None)
    finally:
        torch.set_num_threads(n)
    assert {r["attack"] for r in res["runs"]} == set(TINY)
    for r in res["runs"]:
        assert r["accounting_ok"] and 0 < r["queries_attack"] == r["queries_target"] <= 48, r["attack_id"]
