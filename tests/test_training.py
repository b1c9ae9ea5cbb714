"""The detector training pipeline, end to end on a tiny configuration of real data (seconds)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from guardian_plugin.cli import main as cli_main
from guardian_plugin.detector import load_detector
from guardian_plugin.errors import ConfigError
from guardian_plugin.training.config import load_train_config
from guardian_plugin.training.pipeline import calibrate, train_detector

torch.set_num_threads(1)
TINY = "tests/data/tiny-detector-config.yaml"


def test_calibrate_meets_target_on_every_group():
    rng = np.random.RandomState(0)
    groups = {"a": rng.normal(0, 1, (2000, 3)), "b": rng.normal(0.5, 1, (1000, 3))}
    thr, level, fprs = calibrate(groups, 0.02)
    assert 0 < level <= 0.02
    assert max(fprs.values()) <= 0.02
    # the harder group binds: it sits close to the target
    assert fprs["b"] > 0.01
    for g, s in groups.items():
        assert fprs[g] == pytest.approx(float((s >= thr).any(1).mean()))


def test_tiny_pipeline_end_to_end(tmp_path):
    cfg, base = load_train_config(TINY)
    cfg.cache = str(tmp_path / "cache")
    out = tmp_path / "artifact"
    report = train_detector(cfg, base, str(out), progress=False)
    for f in ("detector.yaml", "report.json", "roc.png", "transform_discriminator.pt",
              "subdetector_dfme.pt", "subdetector_gan.pt", "subdetector_diffusion.pt"):
        assert (out / f).exists(), f
    assert set(report["dacc"]) == {"dfme", "gan", "diffusion"}
    assert set(report["fpr"]) == {"digits", "photos"}
    assert max(report["calibration_fpr"].values()) <= cfg.target_fpr
    # two runs, each sampled at its initial state and at least one checkpoint
    assert report["sources"]["dfme"]["runs"] == 2 and report["sources"]["dfme"]["generator_states"] >= 2 * 2
    saved = json.loads((out / "report.json").read_text())
    assert saved["seed"] == cfg.seed and saved["versions"]["torch"] == torch.__version__
    det = load_detector(str(out))
    assert det.names == ["dfme", "gan", "diffusion"]
    assert det.spec.num_classes == cfg.victim.num_classes == 10  # what guardian_plugin.fit checks a model against
    assert torch.allclose(det.thresholds, torch.tensor([report["thresholds"][n] for n in det.names]))
    # the second run reuses every cached source and the discriminator
    report2 = train_detector(cfg, base, str(tmp_path / "again"), progress=False)
    assert all(s["cached"] for s in report2["sources"].values())


def test_train_config_errors_name_file_and_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(open(TINY).read().replace("generative_data: digits", "generative_data: nope"))
    with pytest.raises(ConfigError, match="generative_data 'nope'"):
        load_train_config(str(bad))
    bad.write_text(open(TINY).read().replace("kind: mnist, split: test", "kind: mnist2, split: test"))
    with pytest.raises(ConfigError) as e:
        load_train_config(str(bad))
    assert str(bad) in str(e.value) and "real.evaluate.0.kind" in str(e.value)
    assert cli_main(["train-detector", "--config", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "o")]) == 2


def test_source_cache_keys_include_the_victim_only_where_the_source_queries_it():
    """A new victim regenerates the dfme source (it attacks the victim) but reuses the GAN and diffusion
    sources, which never see it; any other setting of a source changes its key."""
    from guardian_plugin.training.pipeline import source_cache_key

    cfg, _ = load_train_config(TINY)
    for name, s in cfg.sources.items():
        a, b = source_cache_key(cfg, s, "victim-a"), source_cache_key(cfg, s, "victim-b")
        assert (a != b) == (s.kind == "dfme"), name
        other = s.model_copy(update={"n": s.n + 1})
        assert source_cache_key(cfg, other, "victim-a") != a, name
    assert {s.kind for s in cfg.sources.values()} >= {"dfme", "gan"}
