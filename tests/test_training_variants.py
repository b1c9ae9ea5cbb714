"""train-detector end to end with the transforms and sub-detectors beside the default (tiny sizes, seconds),
and the JPEG round trip of synthetic images (``synthetic_jpeg``)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from guardian_plugin.detector import load_detector
from guardian_plugin.training import pipeline
from guardian_plugin.training.augment import jpeg_roundtrip
from guardian_plugin.training.config import load_train_config
from guardian_plugin.training.data import to_float
from test_pretrained import needs_effnet
from training_fixtures import real_data_once

torch.set_num_threads(1)
TINY = "tests/data/tiny-detector-config.yaml"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(autouse=True, scope="module")
def real_once():
    """Each real-data entry is read once for the whole module (reading MNIST and the photos takes seconds)."""
    with real_data_once():
        yield


def tiny(cache: str, transform: str, params: dict | None = None, arch: str = "small_resnet", arch_params=None, **top):
    """The tiny config with one GAN source, a short evaluation split and the given detector settings."""
    cfg, base = load_train_config(TINY)
    cfg.cache = cache
    cfg.sources = {"gan": cfg.sources["gan"]}
    cfg.real.evaluate[0].range = (0, 200)
    d = cfg.detector
    d.transform, d.transform_params, d.arch = transform, {transform: params or {}}, arch
    d.arch_params = arch_params or {"width": 4, "blocks": 1}
    for k, v in top.items():
        setattr(cfg, k, v)
    return cfg, base


@pytest.mark.parametrize("transform,params,arch,arch_params", [
    ("npr", {}, "small_resnet", None),
    pytest.param("effnet_gradient", {"resolution": 32}, "small_resnet", None, marks=needs_effnet),
    pytest.param("effnet_features", {"resolution": 32, "block": 2}, "small_resnet", None, marks=needs_effnet),
    pytest.param("identity", {}, "effnet_lite0_head", {"resolution": 32}, marks=needs_effnet),
])
def test_train_detector_end_to_end(cache, tmp_path, transform, params, arch, arch_params):
    cfg, base = tiny(cache, transform, params, arch, arch_params)
    out = tmp_path / "artifact"
    report = pipeline.train_detector(cfg, base, str(out), progress=False)
    assert report["transforms"] == {"gan": transform} and set(report["dacc"]) == {"gan"}
    assert report["synthetic_jpeg"] is None and "jpeg_quality" not in report["sources"]["gan"]
    assert max(report["calibration_fpr"].values()) <= cfg.target_fpr
    det = load_detector(str(out))
    assert det.spec.transforms[transform].get("scale", 1.0) > 0  # effnet_features: estimated and stored
    x = torch.rand(5, 1, 28, 28)
    flagged, scores = det.flag(x)
    assert scores.shape == (5, 1) and torch.allclose(det.scores(x[:2]), scores[:2], atol=1e-4)
    # artifacts stay small: no pretrained weights are written into them
    assert sum(f.stat().st_size for f in out.glob("*.pt")) < 1e6


def test_synthetic_jpeg_round_trips_every_synthetic_image(cache, tmp_path, monkeypatch):
    x = (np.random.RandomState(0).rand(4, 3, 32, 32) * 255).astype(np.uint8)
    y = pipeline.jpeg_images(x, 75)
    assert y.dtype == np.uint8 and y.shape == x.shape and not np.array_equal(x, y)
    assert np.array_equal(y[1], (jpeg_roundtrip(to_float(x[1]), 75) * 255).round().numpy().astype(np.uint8))
    seen, real_jpeg = [], pipeline.jpeg_images

    def spy(a, q):
        seen.append((len(a), q))
        return real_jpeg(a, q)

    monkeypatch.setattr(pipeline, "jpeg_images", spy)
    cfg, base = tiny(cache, "npr", synthetic_jpeg=75)
    report = pipeline.train_detector(cfg, base, str(tmp_path / "a"), progress=False)
    assert seen == [(cfg.sources["gan"].n, 75)]  # every image of the source, before the train/val/test split
    assert report["synthetic_jpeg"] == 75 and report["sources"]["gan"]["jpeg_quality"] == 75
    assert report["config"]["synthetic_jpeg"] == 75



def test_precompute_pays_the_transform_once_per_view(cache, tmp_path, monkeypatch):
    """``precompute``: the transform runs on views x images (+ scoring), not epochs x images, and the
    artifact it writes serves exactly like one trained the usual way."""
    calls = []
    cfg, base = tiny(cache, "npr")
    cfg.detector.precompute, cfg.detector.precompute_views, cfg.detector.epochs = True, 2, 3
    real_views = pipeline._precomputed_views

    def spy(transform, x, d, gen, device, name, progress, batch=256):
        views = real_views(transform, x, d, gen, device, name, progress, batch)
        calls.append((len(x), len(views), views[0].dtype, tuple(views[0].shape)))
        return views

    monkeypatch.setattr(pipeline, "_precomputed_views", spy)
    report = pipeline.train_detector(cfg, base, str(tmp_path / "a"), progress=False)
    n_train = report["sources"]["gan"]["train"]
    assert calls == [(2 * n_train, 2, torch.float16, (2 * n_train, 1, 28, 28))]
    assert len(report["training_history"]["gan"]) == 3
    assert max(report["calibration_fpr"].values()) <= cfg.target_fpr
    det = load_detector(str(tmp_path / "a"))
    assert det.scores(torch.rand(3, 1, 28, 28)).shape == (3, 1)


def test_source_splits_are_disjoint_seeded_and_sized():
    cfg, _ = load_train_config(TINY)
    cfg.test_fraction, cfg.val_fraction = 0.2, 0.1
    x = np.arange(100).reshape(100, 1, 1, 1).astype(np.uint8)
    tr, va, te = pipeline.source_splits(x, cfg)
    assert (len(tr), len(va), len(te)) == (70, 10, 20)
    assert len(set(tr.ravel()) | set(va.ravel()) | set(te.ravel())) == 100
    assert all(np.array_equal(a, b) for a, b in zip((tr, va, te), pipeline.source_splits(x, cfg)))


def test_natural_photos_are_whole_non_cifar_images():
    pytest.importorskip("foolbox")
    from guardian_plugin.training.data import natural_photos

    d = natural_photos(32, 3)
    assert {k: len(v) for k, v in d.items()} == {"foolbox_imagenet": 20, "foolbox_cifar100": 20,
                                                  "skimage_photos": 9, "lfw_faces": 50}
    assert all(v.dtype == np.uint8 and v.shape[1:] == (3, 32, 32) for v in d.values())


def test_cli_prepares_only_the_named_sources(tmp_path, capsys):
    """`train-detector --prepare-only --sources NAME`: one source's cache entry (so that several processes
    can fill the cache in parallel), in the folder `--cache` names; an unknown name is an error naming
    the config's sources."""
    import yaml

    from guardian_plugin.cli import main

    raw = yaml.safe_load(open(TINY))
    for e in raw["real"]["train"] + raw["real"]["calibrate"] + raw["real"]["evaluate"]:
        if e.get("path"):
            e["path"] = os.path.join(os.path.abspath(os.path.dirname(TINY)), e["path"])
    if raw.get("victim", {}).get("weights"):
        raw["victim"]["weights"] = os.path.join(os.path.abspath(os.path.dirname(TINY)), raw["victim"]["weights"])
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    args = ["train-detector", "--config", str(cfg), "--out", str(tmp_path / "out"), "--prepare-only",
            "--transform", "identity", "--no-progress", "--cache", str(tmp_path / "cache")]
    assert main(args + ["--sources", "gan"]) == 0
    assert [p.name.split("-")[1] for p in (tmp_path / "cache").glob("source-*.npz")] == ["gan"]
    with pytest.raises(SystemExit, match="nope not in the config"):
        main(args + ["--sources", "nope"])
