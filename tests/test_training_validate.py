"""train-detector's up-front config check (training/validate.py), the per-stage timings file and the
stage lines on stderr. Everything here either refuses a config before anything runs or trains a tiny
config (one small GAN source, seconds)."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
import yaml
from test_cifar10_data import needs_data
from training_fixtures import real_data_once

from guardian_plugin.cli import main
from guardian_plugin.errors import ConfigError
from guardian_plugin.training import data, pipeline, validate
from guardian_plugin.training.config import load_train_config
from guardian_plugin.training.validate import check_config

torch.set_num_threads(1)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "tests", "data", "tiny-detector-config.yaml")
EXAMPLES = [os.path.join(ROOT, "examples", "mnist", "detector-config.yaml"),
            pytest.param(os.path.join(ROOT, "examples", "cifar10", "detector-config.yaml"), marks=needs_data)]


def write_config(tmp_path, edit=None, name="cfg.yaml") -> str:
    """The tiny config as a file in tmp_path (its relative paths made absolute), after ``edit(raw)``."""
    raw = yaml.safe_load(open(TINY))
    raw["victim"]["weights"] = os.path.join(os.path.dirname(TINY), raw["victim"]["weights"])
    raw["cache"] = str(tmp_path / "cache")
    if edit:
        edit(raw)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def at_224(raw):
    """A ResNet-50 user's format: 3 x 224 x 224, photos for the real class (MNIST is 28 px)."""
    raw.update(channels=3, size=224, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    for split, entries in raw["real"].items():
        for i, e in enumerate(entries):
            entries[i] = {"name": e["name"], "kind": "photos", "group": split, "n": 100, "seed": i}
    raw["sources"] = {"gan": raw["sources"]["gan"]}


@pytest.fixture
def no_data(monkeypatch):
    """Any data loading or training called while this is active fails the test."""
    def refuse(*a, **k):
        raise AssertionError("data was loaded or something trained before the config was checked")

    for mod, names in ((pipeline, ("load_real", "mnist_splits", "photo_crops", "image_folder", "cifar10_split",
                                   "load_victim", "_train_discriminator", "train_subdetector")),
                       (data, ("mnist_splits", "photo_crops", "image_folder", "cifar10_split"))):
        for n in names:
            monkeypatch.setattr(mod, n, refuse)


@pytest.fixture(scope="module", autouse=True)
def real_once():
    """Each real-data entry is read once for the whole module (MNIST and the photos take seconds)."""
    with real_data_once():
        yield


# --------------------------------------------------------------------------------- the check
def test_224_px_gan_source_and_discriminator_are_refused_at_once(tmp_path, no_data, capsys):
    check_config(*load_train_config(TINY))  # imports warmed up: what is timed below is the check itself
    cfg_path = write_config(tmp_path, at_224)
    cfg, base = load_train_config(cfg_path)
    t = time.perf_counter()
    with pytest.raises(ConfigError) as e:
        check_config(cfg, base, cfg_path)
    assert time.perf_counter() - t < 1.0
    msg = str(e.value)
    assert msg.startswith(cfg_path) and "2 problems" in msg
    gan = next(line for line in msg.splitlines() if line.strip().startswith("sources.gan:"))
    assert "28, 32 or 64 px, not 224" in gan and "'diffusion'" in gan and "'folder'" in gan
    disc = next(line for line in msg.splitlines() if line.strip().startswith("detector.transform:"))
    assert "'discriminator'" in disc and "28, 32 or 64 px" in disc and "npr" in disc and "identity" in disc
    # the command: exit 2 with the same message, before creating the artifact directory
    out = tmp_path / "out"
    assert main(["train-detector", "--config", cfg_path, "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "sources.gan" in err and "detector.transform" in err and not out.exists()


def test_every_problem_is_named_by_its_field(tmp_path, no_data):
    def edit(raw):
        raw["size"] = 30  # GeneratorA (dfme) needs a multiple of 4; mnist is 28 px
        raw["sources"]["diffusion"]["params"]["width"] = 12  # the UNet's group norm: multiples of 8
        raw["sources"]["odd"] = {"kind": "stylegan", "n": 10}
        raw["sources"]["diffusion"]["params"]["stpes"] = 8
        raw["detector"]["per_source_transform"] = {"nope": "identity"}
        raw["victim"]["weights"] = str(tmp_path / "missing.pt")

    path = write_config(tmp_path, edit)
    with pytest.raises(ConfigError) as e:
        check_config(*load_train_config(path), path)
    fields = {line.split(":")[0].strip() for line in str(e.value).splitlines()[1:]}
    assert {"real.train.0 (digits)", "victim.weights", "sources.dfme", "sources.gan", "sources.diffusion.params",
            "sources.diffusion.params.width", "sources.odd", "detector.per_source_transform.nope",
            "detector.transform"} <= fields, fields
    assert "multiple of 4" in str(e.value) and "unknown source kind 'stylegan'" in str(e.value)


def test_dfme_memory_at_224_px_is_estimated_against_the_machine(tmp_path, no_data, monkeypatch):
    """The issue's DFME source at 224 px: a ~103M-parameter generator (its first Linear), every attack's
    kept checkpoints and replay buffer; refused on a machine that cannot hold it, with what to lower."""
    def edit(raw):
        at_224(raw)
        raw["detector"]["transform"] = "npr"
        raw["sources"] = {"dfme": {"kind": "dfme", "n": 3000, "params": {
            "budget": 15000, "checkpoints": 5, "variants": [{"output": "normalised"}, {"output": "pixels"}]}}}

    monkeypatch.setattr(validate, "machine_memory", lambda: (16 * 1024 ** 3, 12 * 1024 ** 3))
    path = write_config(tmp_path, edit)
    cfg, base = load_train_config(path)
    with pytest.raises(ConfigError) as e:
        check_config(cfg, base, path)
    msg = str(e.value)
    assert "sources.dfme: the run needs roughly" in msg and "16.00 GB" in msg and "checkpoints" in msg
    plan = e.value.plan
    assert any("102.8M in its first Linear" in n for n in plan.notes)
    gens = next(b for f, what, b in plan.memory if what.startswith("dfme generators"))
    assert 7 * 1024 ** 3 < gens < 9 * 1024 ** 3  # 2 attacks x (6 states + 4) x 103M float32 parameters
    # what the message suggests makes it fit
    cfg.sources["dfme"].params.update(ngf=16, nz=64, memory=0, batch_size=32)
    plan = check_config(cfg, base, path)
    assert plan.peak_bytes < 12 * 1024 ** 3 and not plan.warnings


@pytest.mark.parametrize("path", EXAMPLES)
def test_example_configs_pass_the_check(path, no_data):
    cfg, base = load_train_config(path)
    plan = check_config(cfg, base, path)
    assert plan.stages[:2] == ["real_data", "victim"] and plan.stages[-1] == "artifact"
    assert set(plan.sources) == {"dfme", "gan", "diffusion"} and 0 < plan.peak_bytes < 4 * 1024 ** 3


@pytest.mark.parametrize("path", EXAMPLES)
def test_example_configs_get_a_time_estimate_from_their_own_committed_run(path, no_data, tmp_path):
    """Nothing cached: each source costs what its committed run recorded building it (report.json
    sources.*.seconds); the sub-detectors what that run's took, scaled by epochs x training images."""
    cfg, base = load_train_config(path)
    cfg.cache = str(tmp_path / "empty-cache")
    times = check_config(cfg, base, path).times
    report = os.path.join(os.path.dirname(path), "artifacts", "detector", "report.json")
    assert times.reference == report
    rep = json.load(open(report))
    by = {s.stage: s for s in times.stages}
    for name, info in rep["sources"].items():
        assert by[f"source_{name}"].low_s == pytest.approx(info["seconds"]) and "recorded build time" in by[f"source_{name}"].how
    nets = [v for k, v in rep["timings_s"].items() if k.startswith(("subdetector_", "trunk_"))]
    assert by[[s for s in by if s.startswith(("subdetector_", "trunk_"))][0]].low_s == pytest.approx(sum(nets) / len(nets))
    # sizes scale it: twice the DFME queries and twice the detector epochs, twice the time
    cfg.sources["dfme"].params["budget"] *= 2
    cfg.detector.epochs *= 2
    by2 = {s.stage: s for s in check_config(cfg, base, path).times.stages}
    assert by2["source_dfme"].low_s == pytest.approx(2 * rep["sources"]["dfme"]["seconds"])
    assert "queries (budget x variants x runs) (x2.00)" in by2["source_dfme"].how
    net = next(s for s in by if s.startswith(("subdetector_", "trunk_")))
    assert by2[net].low_s == pytest.approx(2 * by[net].low_s)
    # diffusion: training steps and sampling scale differently, so both bounds are given
    cfg.sources["diffusion"].params["steps"] //= 2
    d = {s.stage: s for s in check_config(cfg, base, path).times.stages}["source_diffusion"]
    assert d.low_s == pytest.approx(rep["sources"]["diffusion"]["seconds"] / 2, rel=0.01)
    assert d.high_s == pytest.approx(rep["sources"]["diffusion"]["seconds"])


def test_imagenet_config_on_a_fresh_checkout_names_the_one_command_and_prints_times(tmp_path, no_data, capsys):
    """The victim weights and the foolbox folder are not committed: the check names the command that
    writes them (the config's prepared_by, an option of examples/imagenet/build.py), and still prints the
    plan with each stage's time from the committed ImageNet run."""
    src = os.path.join(ROOT, "examples", "imagenet", "detector-config.yaml")
    cfg_path = tmp_path / "detector-config.yaml"  # artifacts/ next to it is missing, as on a fresh checkout
    cfg_path.write_text(open(src).read())
    assert main(["train-detector", "--config", str(cfg_path), "--out", str(tmp_path / "out"), "--check"]) == 2
    cap = capsys.readouterr()
    cmd = "run `python -m examples.imagenet.build --victim-only` first"
    problems = [line for line in cap.err.splitlines() if line.strip().startswith(("victim.weights", "real.evaluate.1"))]
    assert len(problems) == 2 and all(cmd in line for line in problems), cap.err
    assert "train the victim first" not in cap.err
    assert '"--victim-only"' in open(os.path.join(ROOT, "examples", "imagenet", "build.py")).read()
    assert "time estimate per stage (from " in cap.out and "imagenet/artifacts/detector/report.json" in cap.out
    dfme = next(line for line in cap.out.splitlines() if line.strip().startswith("source_dfme"))
    assert "15 min" in dfme  # 896.6 s recorded building it
    assert "pipeline-timing.json" in cap.out and "total, one stage after another" in cap.out


def test_no_time_estimate_without_a_committed_run_at_that_size(tmp_path, no_data):
    from guardian_plugin.training.estimate import estimate_times

    cfg, base = load_train_config(write_config(tmp_path))
    cfg.size = 48
    est = estimate_times(cfg, str(tmp_path), ["real_data"], {}, {}, examples_dir=str(tmp_path))
    assert est.reference is None and "no committed detector run at 1 x 48 x 48" in est.lines()[0]


def test_unknown_architecture_lists_the_registry_and_docs_hold_the_same_table(tmp_path, no_data):
    from guardian_plugin.nets import CLASSIFIERS, architectures_markdown

    path = write_config(tmp_path, lambda raw: raw["victim"].update(arch="resnet5O"))
    with pytest.raises(ConfigError) as e:
        check_config(*load_train_config(path), path)
    line = next(x for x in str(e.value).splitlines() if x.strip().startswith("victim.arch"))
    assert all(f"{n} (" in line for n in CLASSIFIERS) and "LeNet-5" in line
    assert architectures_markdown() in open(os.path.join(ROOT, "docs", "detector.md")).read(), \
        "docs/detector.md's architecture table is stale: paste `python -m guardian_plugin.nets`"


def test_check_prints_the_plan_and_exits_0(tmp_path, no_data, capsys):
    cfg = write_config(tmp_path)
    out = tmp_path / "out"
    assert main(["train-detector", "--config", cfg, "--out", str(out), "--check"]) == 0
    text = capsys.readouterr().out
    assert "stages (12): real_data, victim, source_dfme" in text
    for s in ("source dfme: kind dfme, 60 images", "source gan: kind gan", "sub-detectors: small_resnet",
              "memory (rough peak", "dfme GeneratorA", "config OK"):
        assert s in text, s
    assert not out.exists()
    # --dry-run is the same; a bad config exits 2
    assert main(["train-detector", "--config", write_config(tmp_path, at_224, "bad.yaml"), "--out", str(out),
                 "--dry-run"]) == 2


# ------------------------------------------------------------------ timings and stage lines
def tiny(tmp_path):
    cfg, base = load_train_config(TINY)
    cfg.cache = str(tmp_path / "cache")
    cfg.sources = {"gan": cfg.sources["gan"]}
    cfg.real.evaluate[0].range = (0, 200)
    cfg.detector.transform, cfg.detector.arch_params = "npr", {"width": 4, "blocks": 1}
    return cfg, base


def test_timings_file_after_a_run_and_after_a_late_failure(tmp_path, monkeypatch):
    cfg, base = tiny(tmp_path)
    out = tmp_path / "ok"
    report = pipeline.train_detector(cfg, base, str(out), progress=False)
    t = json.loads((out / "timings.json").read_text())
    assert t["status"] == "finished" and t["running"] is None and "failed" not in t
    assert list(t["timings_s"]) == t["stages_planned"] == [
        "real_data", "victim", "source_gan", "transforms", "subdetector_gan", "calibration", "evaluation", "artifact"]
    assert set(report["timings_s"]) == set(t["timings_s"]) - {"artifact"} | {"total"}

    def boom(*a, **k):
        raise RuntimeError("calibration exploded")

    monkeypatch.setattr(pipeline, "calibrate", boom)
    out = tmp_path / "failed"
    with pytest.raises(RuntimeError, match="exploded"):
        pipeline.train_detector(cfg, base, str(out), progress=False)
    t = json.loads((out / "timings.json").read_text())
    assert t["status"] == "failed" and t["failed"]["stage"] == "calibration"
    assert t["failed"]["error"] == "RuntimeError: calibration exploded"
    assert list(t["timings_s"]) == ["real_data", "victim", "source_gan", "transforms", "subdetector_gan"]
    assert all(v >= 0 for v in t["timings_s"].values()) and t["elapsed_s"] >= sum(t["timings_s"].values())


def test_stage_lines_on_stderr_with_no_progress_and_not_with_quiet(tmp_path, capsys):
    cfg = write_config(tmp_path)
    args = ["train-detector", "--config", cfg, "--prepare-only", "--sources", "gan", "--transform", "identity"]
    assert main(args + ["--out", str(tmp_path / "a"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("[train-detector")]
    for stage in ("real_data", "victim", "source_gan", "transforms"):
        assert any(f"stage {stage} (" in line and "started" in line for line in lines), stage
        assert any(f"stage {stage} (" in line and " done in " in line for line in lines), stage
    assert "config checked: 4 stages planned" in err and "train-detector prepared" in err
    assert "it/s" not in err  # no progress bars
    assert json.loads((tmp_path / "a" / "timings.json").read_text())["status"] == "prepared"
    assert main(args + ["--out", str(tmp_path / "b"), "--quiet"]) == 0
    assert "[train-detector" not in capsys.readouterr().err
