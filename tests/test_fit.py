"""The detector must fit the model it guards (guardian_plugin.fit): the rules, `guardian protect` on real
torch-model-archiver archives, and the check at worker load."""

from __future__ import annotations

import logging
import os
import sys

import pytest
import torch
import torch.nn as nn
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from examples.mnist import serving as ex  # noqa: E402
from guardian_plugin.config import parse_config  # noqa: E402
from guardian_plugin.detector import DetectorSpec, ImageSpec, InputMapping, SubDetectorSpec  # noqa: E402
from guardian_plugin.errors import ConfigError, ModelMismatch  # noqa: E402
from guardian_plugin.fit import ModelSpec, check_fit, verify_handler_fit  # noqa: E402

MNIST = ModelSpec(1, 28, 28, 10, ex.MNIST_MEAN, ex.MNIST_STD)
IMAGENET = ModelSpec(3, 224, 224, 1000, ex.IMAGENET_MEAN, ex.IMAGENET_STD)


def spec(channels=1, size=28, num_classes=10, mean=ex.MNIST_MEAN, std=ex.MNIST_STD, fit="center_crop"):
    return DetectorSpec(format_version=1, image=ImageSpec(channels=channels, size=size), num_classes=num_classes,
                        input=InputMapping(mean=mean, std=std, fit=fit),
                        subdetectors=[SubDetectorSpec(name="s", transform="identity", weights="s.pt")])


# ------------------------------------------------------------------------------------------ the rules
def test_mnist_detector_fits_mnist_and_not_imagenet():
    assert check_fit(spec(), MNIST) == []
    with pytest.raises(ModelMismatch) as e:
        check_fit(spec(), IMAGENET)
    msg = str(e.value)
    assert "detector trained for 1x28x28 inputs, 10 classes" in msg
    assert "the model takes 3x224x224 inputs and returns 1000 classes" in msg
    assert "class count" in msg and "normalises" in msg and "center crop" in msg and "allow_mismatch" in msg
    assert isinstance(e.value, ConfigError)


@pytest.mark.parametrize("model, det, problem", [
    (ModelSpec(1, 28, 28, 100), spec(), "class count"),
    (ModelSpec(2, 28, 28, 10), spec(), "channels"),
    (ModelSpec(1, 24, 28, 10), spec(), "smaller"),
    (ModelSpec(1, 28, 28, 10, [0.5], [0.5]), spec(), "normalises"),
    (ModelSpec(1, 113, 113, 10), spec(), "center crop"),  # > 4 x 28
    (ModelSpec(1, 28, 28, 10), spec(mean=[0.1, 0.2, 0.3]), "3 means"),
])
def test_each_mismatch_is_named(model, det, problem):
    with pytest.raises(ModelMismatch, match=problem):
        check_fit(det, model)


@pytest.mark.parametrize("model, det", [
    (ModelSpec(3, 28, 28, 10, ex.MNIST_MEAN * 3, ex.MNIST_STD * 3), spec()),  # RGB -> grey: averaged
    (ModelSpec(1, 32, 32, 10), spec(channels=3, mean=[0.0], std=[1.0])),  # grey -> RGB: repeated
    (ModelSpec(1, 112, 112, 10), spec()),  # a center crop of up to 4x the size
    (ModelSpec(3, 224, 224, 10, ex.IMAGENET_MEAN, ex.IMAGENET_STD),  # the TorchServe tests' `rgb` model
     spec(mean=ex.IMAGENET_MEAN, std=ex.IMAGENET_STD, fit="area")),
    (ModelSpec(1, 28, 28, 1000), spec(num_classes=None)),  # an older artifact: class count unchecked
])
def test_what_the_detector_can_adapt_fits(model, det):
    assert check_fit(det, model) == []


def test_allow_mismatch_warns_and_proceeds(caplog):
    with caplog.at_level(logging.WARNING, "guardian_plugin"):
        problems = check_fit(spec(), IMAGENET, allow_mismatch=True)
    assert len(problems) == 3 and "3x224x224" in caplog.text


def test_guardian_from_config_checks_a_given_model(tmp_path):
    from guardian_plugin.guardian import Guardian

    cfg = parse_config({"detector": ex.DETECTOR, "ledger": "memory://"})
    assert Guardian.from_config(cfg, model=MNIST).detector.spec.num_classes == 10
    with pytest.raises(ModelMismatch, match="1000 classes"):
        Guardian.from_config(cfg, model=IMAGENET)
    Guardian.from_config(parse_config({"detector": ex.DETECTOR, "ledger": "memory://", "allow_mismatch": True}),
                         model=IMAGENET)


# --------------------------------------------------------------------------- archives and workers
class TinyImageNetNet(nn.Module):
    """3 x 224 x 224 in, 1000 logits out: an ImageNet classifier's interface at a fraction of its cost."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 8, stride=8)
        self.fc = nn.Linear(4, 1000)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
    pytest.importorskip("ts")
    from guardian_plugin.devserver.torchserve import build_archive

    w = tmp_path_factory.mktemp("fit")
    torch.manual_seed(0)
    torch.jit.trace(TinyImageNetNet().eval(), torch.zeros(1, 3, 224, 224)).save(str(w / "resnet.pt"))
    return {"resnet": build_archive("resnet", str(w / "resnet.pt"), "image_classifier", str(w)),
            "mnist": build_archive("mnist", ex.VICTIM_TS, ex.MNIST_HANDLER, str(w))}


def test_protect_refuses_a_model_the_detector_was_not_trained_for(tmp_path, archives, capsys):
    from guardian_plugin.cli import main
    from guardian_plugin.handlers.archive import protect

    out = tmp_path / "r.mar"
    with pytest.raises(ModelMismatch, match="1x28x28 inputs, 10 classes; the model takes 3x224x224 inputs and "
                                            "returns 1000 classes"):
        protect(archives["resnet"], ex.DETECTOR, str(out))
    assert not out.exists()
    assert main(["protect", archives["resnet"], "--detector", ex.DETECTOR, "-o", str(out)]) == 2
    assert "--allow-mismatch" in capsys.readouterr().err and not out.exists()


def test_protect_with_the_override_writes_it_into_the_guard_settings(tmp_path, archives, capsys, monkeypatch):
    from guardian_plugin.cli import main
    from guardian_plugin.handlers.archive import load_archive_handler, read_archive, rewrite_archive

    out = str(tmp_path / "r.mar")
    assert main(["protect", archives["resnet"], "--detector", ex.DETECTOR, "-o", out, "--allow-mismatch"]) == 0
    printed = capsys.readouterr().out
    assert "MISMATCH, allowed" in printed
    # protect says which victim the detector was trained against (the example's LeNet-5), not this ResNet
    assert "trained against the victim lenet5, 10 classes" in printed and "--calibrate" in printed
    manifest, files = read_archive(out)
    mc = yaml.safe_load(files[manifest["model"]["configFile"]])
    assert mc["handler"]["guardian"]["guard"]["allow_mismatch"] is True
    # at worker load: the guarded handler loads with the override, and refuses to without it
    monkeypatch.setenv("GUARDIAN_STATE_DIR", str(tmp_path / "state"))
    assert load_archive_handler(manifest, files, str(tmp_path / "allowed")).guard is not None
    mc["handler"]["guardian"]["guard"]["allow_mismatch"] = False
    strict = str(tmp_path / "strict.mar")
    rewrite_archive(out, strict, handler_config={"guardian": mc["handler"]["guardian"]})
    with pytest.raises(ModelMismatch, match="3x224x224"):
        load_archive_handler(*read_archive(strict), str(tmp_path / "strict"))


def test_protect_accepts_the_mnist_detector_on_the_mnist_archive(tmp_path, archives, monkeypatch):
    from guardian_plugin.handlers.archive import load_archive_handler, protect, read_archive

    s = protect(archives["mnist"], ex.DETECTOR, str(tmp_path / "m.mar"))
    assert s["fit"] == "the model takes 1x28x28 inputs and returns 10 classes" and s["mismatch"] == []
    monkeypatch.setenv("GUARDIAN_STATE_DIR", str(tmp_path / "state"))
    guarded = load_archive_handler(*read_archive(str(tmp_path / "m.mar")), str(tmp_path / "x"))
    model = verify_handler_fit(guarded.inner, guarded.guard.guardian.detector, parse_config({"detector": "."}))
    assert (model.channels, model.height, model.num_classes) == (1, 28, 10)
    assert model.mean == pytest.approx(ex.MNIST_MEAN, abs=1e-4) and model.std == pytest.approx(ex.MNIST_STD, abs=1e-4)


def test_protect_input_fit_maps_a_224_handler_to_a_32_px_detector(tmp_path, archives, capsys, monkeypatch):
    """A CIFAR-style detector (3 x 32 x 32, ImageNet normalisation, center_crop) cannot read the 224 px
    tensors of TorchServe's image_classifier handler; `--input-fit area` sets the embedded copy's
    mapping (the artifact on disk is unchanged) and the workers load with it."""
    from guardian_plugin.cli import main
    from guardian_plugin.detector import SubDetector, read_spec, save_detector
    from guardian_plugin.handlers.archive import load_archive_handler, protect, read_archive

    det = str(tmp_path / "det32")
    torch.manual_seed(0)
    save_detector(det, spec(3, 32, 1000, ex.IMAGENET_MEAN, ex.IMAGENET_STD).model_copy(
        update={"subdetectors": [SubDetectorSpec(name="s", transform="identity", weights="s.pt",
                                                 arch_params={"width": 4, "blocks": 1}, threshold=0.0)]}),
                  [SubDetector("small_resnet", 3, 32, width=4, blocks=1)])
    with pytest.raises(ModelMismatch, match="center crop"):
        protect(archives["resnet"], det, str(tmp_path / "no.mar"))
    out = str(tmp_path / "area.mar")
    assert main(["protect", archives["resnet"], "--detector", det, "-o", out, "--input-fit", "area"]) == 0
    assert "detector input fit area" in capsys.readouterr().out
    manifest, files = read_archive(out)
    embedded = yaml.safe_load(files["guardian/detector/detector.yaml"])
    assert embedded["input"] == {"mean": ex.IMAGENET_MEAN, "std": ex.IMAGENET_STD, "fit": "area"}
    assert read_spec(det).input.fit == "center_crop"  # the artifact itself is not rewritten
    monkeypatch.setenv("GUARDIAN_STATE_DIR", str(tmp_path / "state"))
    guarded = load_archive_handler(manifest, files, str(tmp_path / "x"))  # the worker-load fit check passes
    assert guarded.guard.guardian.detector.spec.input.fit == "area"
    with pytest.raises(ConfigError, match="fit must be"):
        protect(archives["resnet"], det, str(tmp_path / "bad.mar"), input_fit="nearest")
