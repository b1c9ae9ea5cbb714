"""The TorchServe adapter's pieces without a server: flagged-row rewriting, input checks, archive
rewriting and the `guardian protect` command (real torch-model-archiver archives)."""

from __future__ import annotations

import base64
import io
import json
import os
import sys
import zipfile

import numpy as np
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from guardian_plugin.errors import ConfigError  # noqa: E402
from guardian_plugin.handlers import guard as g  # noqa: E402
from guardian_plugin.handlers.archive import GUARDED_HANDLER, ArchiveError, protect, read_archive  # noqa: E402
from guardian_plugin.handlers.settings import read_settings, resolve_ledger  # noqa: E402
from guardian_plugin.responses import dpreds  # noqa: E402


# ----------------------------------------------------------------------------- flagged-row rewriting
@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(2, 12), st.floats(0.5, 30.0), st.integers(0, 2**31 - 1), st.sampled_from([0.1, 0.5, 2.0]))
def test_rewrite_logits_gives_dpreds_in_the_same_order(b, k, spread, seed, d):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(b, k, generator=gen) * spread
    p = torch.softmax(z, 1)
    flagged = torch.rand(b, generator=gen) < 0.6
    out = g.rewrite_flagged(z, p, dpreds(p, d), flagged, "logits")
    post = torch.softmax(out, 1)  # what ImageClassifier's postprocess does
    for i in range(b):
        if flagged[i]:
            assert torch.allclose(post[i].double(), dpreds(p[i].double(), d), atol=2e-6)
            assert torch.equal(torch.topk(post[i], k).indices, torch.topk(p[i], k).indices)
        else:
            assert torch.equal(out[i], z[i])  # bit for bit


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5), st.integers(2, 12), st.floats(0.5, 30.0), st.integers(0, 2**31 - 1))
def test_rewrite_probabilities_gives_dpreds_in_the_same_order(b, k, spread, seed):
    gen = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(b, k, generator=gen) * spread, 1)
    flagged = torch.ones(b, dtype=torch.bool)
    out = g.rewrite_flagged(p, p, dpreds(p, 0.5), flagged, "probabilities")
    assert torch.allclose(out.double(), dpreds(p.double(), 0.5), atol=2e-6)
    assert torch.equal(torch.topk(out, k).indices, torch.topk(p, k).indices)


def test_output_kind_auto():
    z = torch.tensor([[2.0, -1.0, 0.5]])
    assert g.output_kind(z, "auto") == "logits"
    assert g.output_kind(torch.softmax(z, 1), "auto") == "probabilities"
    assert g.output_kind(torch.softmax(z, 1), "logits") == "logits"
    assert g.output_kind(torch.tensor([[0.2, 0.2, 0.2]]), "auto") == "logits"  # does not sum to one


def test_rewrite_of_an_inference_tensor():
    with torch.inference_mode():
        z = torch.randn(3, 4)
    p = torch.softmax(z, 1)
    out = g.rewrite_flagged(z, p, dpreds(p), torch.tensor([True, False, True]), "logits")
    assert torch.equal(out[1], z[1]) and not torch.equal(out[0], z[0])


# -------------------------------------------------------------------------------------- input checks
def _png(a):
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return buf.getvalue()


def test_precheck_and_diagnose():
    digit = _png((np.random.RandomState(0).rand(28, 28) * 255).astype(np.uint8))
    for row in ({"body": b""}, {"data": None, "body": None}, {"body": ""}):
        with pytest.raises(g.InputError) as e:
            g.precheck(row, 1000)
        assert e.value.status == 400 and e.value.kind == "EmptyInput"
    big = io.BytesIO()
    Image.new("L", (2000, 1000)).save(big, "PNG")
    for body in (big.getvalue(), base64.b64encode(big.getvalue()).decode()):
        with pytest.raises(g.InputError) as e:
            g.precheck({"body": body}, 1_000_000)
        assert e.value.kind == "ImageTooLarge" and "2000x1000" in e.value.message
    g.precheck({"body": digit}, 1000)  # 784 px: fine
    g.precheck({"body": b"not an image"}, 1000)  # left to the handler's own preprocess
    assert g.diagnose({"body": digit[: len(digit) // 2]}, OSError("x")).kind == "CorruptImage"
    assert g.diagnose({"body": b"not an image"}, OSError("x")).kind == "NotAnImage"
    assert g.diagnose({"body": "%% not base64 %%"}, ValueError("x")).kind == "BadBase64"
    assert g.diagnose({"body": [1, 2]}, TypeError("x")).kind == "BadInput"


# ------------------------------------------------------------------------------------------ archives
@pytest.fixture(scope="module")
def stub_detector(tmp_path_factory):
    from guardian_plugin.detector import DetectorSpec, InputMapping, SubDetector, SubDetectorSpec, save_detector

    d = tmp_path_factory.mktemp("det")
    torch.manual_seed(0)
    spec = DetectorSpec(format_version=1, input=InputMapping(mean=[0.1307], std=[0.3081]),
                        subdetectors=[SubDetectorSpec(name="s", transform="identity", weights="s.pt",
                                                      arch_params={"width": 4, "blocks": 1}, threshold=0.0)])
    save_detector(str(d), spec, [SubDetector("small_resnet", 1, 28, width=4, blocks=1)])
    return str(d)


@pytest.fixture(scope="module")
def mnist_mar(tmp_path_factory):
    from examples.mnist import serving as ex
    from guardian_plugin.devserver.torchserve import build_archive

    if not os.path.exists(ex.VICTIM_TS):
        pytest.fail(f"{ex.VICTIM_TS} is missing (committed example artifact)")
    return build_archive("mnist", ex.VICTIM_TS, ex.MNIST_HANDLER, str(tmp_path_factory.mktemp("mar")))


def test_protect_rewrites_manifest_and_embeds_detector(tmp_path, stub_detector, mnist_mar):
    cfg = tmp_path / "guard.yaml"
    cfg.write_text(yaml.safe_dump({"ledger": "sqlite://guardian/mnist.db", "rule": {"tau": 7, "rho": 0.4},
                                   "identity": {"api_key_header": "X-Api-Key", "missing": "reject"}}))
    out = str(tmp_path / "out.mar")
    s = protect(mnist_mar, stub_detector, out, config=str(cfg))
    assert s["wraps"] == "mnist_handler.py" and s["namespace"] == "mnist"
    assert s["distribution"] == "off (the detector artifact has no reference.json)"
    manifest, files = read_archive(out)
    _, orig_files = read_archive(mnist_mar)
    assert manifest["model"]["handler"] == GUARDED_HANDLER
    for name, data in orig_files.items():  # nothing of the original archive changed but the manifest
        if name != "MAR-INF/MANIFEST.json":
            assert files[name] == data
    assert {"guardian/detector/detector.yaml", "guardian/detector/s.pt"} <= set(files)
    mc = yaml.safe_load(files[manifest["model"]["configFile"]])
    gs = mc["handler"]["guardian"]
    assert gs["wrap"] == "mnist_handler.py" and gs["guard"]["rule"]["tau"] == 7
    # what a worker reads back: detector inside the extracted archive, ledger under the state dir
    os.environ["GUARDIAN_STATE_DIR"] = str(tmp_path / "state")
    try:
        settings_, gcfg = read_settings(mc, "/models/x")
    finally:
        del os.environ["GUARDIAN_STATE_DIR"]
    assert gcfg.detector == "/models/x/guardian/detector"
    from guardian_plugin.ledger import sqlite_path

    assert sqlite_path(gcfg.ledger) == f"{tmp_path}/state/guardian/mnist.db"
    assert gcfg.identity.api_key_header == "X-Api-Key" and gcfg.identity.missing == "reject"
    with pytest.raises(ArchiveError, match="already guarded"):
        protect(out, stub_detector, str(tmp_path / "again.mar"))


def test_protect_errors_name_the_problem(tmp_path, stub_detector, mnist_mar):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rule: {rho: 2}\n")
    with pytest.raises(ConfigError, match="rule.rho"):
        protect(mnist_mar, stub_detector, str(tmp_path / "o.mar"), config=str(bad))
    with pytest.raises(ArchiveError, match="not a zip"):
        protect(str(bad), stub_detector, str(tmp_path / "o.mar"))
    from guardian_plugin.errors import ArtifactError

    with pytest.raises(ArtifactError, match="detector.yaml"):
        protect(mnist_mar, str(tmp_path), str(tmp_path / "o.mar"))
    # a function entry point cannot be wrapped
    manifest, files = read_archive(mnist_mar)
    manifest["model"]["handler"] = "mnist_handler.py:handle"
    from guardian_plugin.handlers.archive import write_archive

    fn = write_archive(str(tmp_path / "fn.mar"), manifest, files)
    with pytest.raises(ArchiveError, match="function entry point"):
        protect(fn, stub_detector, str(tmp_path / "o.mar"))


def test_guardian_protect_command(tmp_path, stub_detector, mnist_mar, capsys):
    from guardian_plugin.cli import main

    out = tmp_path / "p.mar"
    assert main(["protect", mnist_mar, "--detector", stub_detector, "-o", str(out),
                 "--ledger", f"sqlite:///{tmp_path}/l.db", "--max-image-pixels", "100000"]) == 0
    assert "guardian_plugin.handlers.GuardedHandler" in capsys.readouterr().out
    manifest, files = read_archive(str(out))
    gs = yaml.safe_load(files[manifest["model"]["configFile"]])["handler"]["guardian"]
    assert gs["max_image_pixels"] == 100000 and gs["guard"]["ledger"] == f"sqlite:///{tmp_path}/l.db"
    assert main(["protect", str(out), "--detector", stub_detector, "-o", str(tmp_path / "q.mar")]) == 2


def test_relative_ledger_is_never_the_worker_cwd(monkeypatch, tmp_path):
    monkeypatch.setenv("GUARDIAN_STATE_DIR", str(tmp_path))
    from guardian_plugin.ledger import sqlite_path

    assert sqlite_path(resolve_ledger("sqlite://a/b.db")) == f"{tmp_path}/a/b.db"
    assert sqlite_path(resolve_ledger("rel.db")) == f"{tmp_path}/rel.db"
    assert sqlite_path(resolve_ledger("sqlite:///abs/x.db")) == "/abs/x.db"
    assert resolve_ledger("memory://") == "memory://"
    monkeypatch.setenv("GUARDIAN_LEDGER", "sqlite:///srv/l.db")
    assert sqlite_path(resolve_ledger("sqlite://x.db")) == "/srv/l.db"


def test_free_ports_are_distinct_and_bindable():
    """The launcher's five TorchServe ports come from one call that holds every socket until all are
    chosen, so no two coincide (two equal ones made TorchServe exit at start-up once)."""
    import socket

    from guardian_plugin.devserver.netutil import free_ports

    ports = free_ports(5)
    assert len(set(ports)) == 5
    for p in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))


def test_guardian_protect_warns_about_a_label_only_archive(tmp_path, stub_detector, mnist_mar, capsys):
    """`guardian protect` says at packaging time what each worker logs at load: DPreds changes nothing a
    label-only archive's clients see (and a response.k above the class count fails here, not in every
    worker)."""
    from examples.mnist import serving as ex
    from guardian_plugin.cli import main
    from guardian_plugin.devserver.torchserve import build_archive

    labels_mar = build_archive("mnist", ex.VICTIM_TS, ex.MNIST_LABEL_HANDLER, str(tmp_path / "labels"))
    assert main(["protect", labels_mar, "--detector", stub_detector, "-o", str(tmp_path / "l.mar")]) == 0
    err = capsys.readouterr().err
    assert "WARNING: the guarded handler's postprocess answers labels only" in err
    assert "flagged queries get the model's own label (response.label_only: top1)" in err
    cfg = tmp_path / "topk.yaml"
    cfg.write_text("response: {policy: dpreds, d: 0.5, label_only: topk, k: 11}\n")
    assert main(["protect", labels_mar, "--detector", stub_detector, "-o", str(tmp_path / "k.mar"),
                 "--config", str(cfg)]) == 2
    assert "response.k is 11 but the model has 10 classes" in capsys.readouterr().err
    assert not (tmp_path / "k.mar").exists()
    assert main(["protect", mnist_mar, "--detector", stub_detector, "-o", str(tmp_path / "s.mar")]) == 0
    assert "labels only" not in capsys.readouterr().err  # an archive answering scores: no warning
    # the example's handler does not resize: its reference (28 px) describes the served path
    from examples.mnist import serving as ex

    assert protect(mnist_mar, ex.DETECTOR, str(tmp_path / "e.mar"))["distribution"] == \
        "on at every input size (the reference describes the served path)"


def test_protect_calibrates_thresholds_on_the_served_path(tmp_path, mnist_mar, capsys, monkeypatch):
    """`guardian protect --calibrate DIR`: the benign images go through the archive's own preprocess and
    the embedded detector, the embedded thresholds are re-set at the artifact's target FPR on every other
    image, and a worker that loads the protected archive's detector flags at most that share of them;
    the artifact on disk is untouched. Too few images, a file the handler cannot decode and a missing
    folder are errors that name the problem, and no archive is written."""
    from examples.mnist import serving as ex
    from guardian_plugin.cli import main
    from guardian_plugin.detector import load_detector, read_spec
    from guardian_plugin.handlers.archive import DETECTOR_DIR, archive_handler
    from guardian_plugin.recalibrate import CALIBRATION_FILE

    bodies, _ = ex.real_digits(300)
    cal = tmp_path / "cal"
    cal.mkdir()
    for i, b in enumerate(bodies):
        (cal / f"{i:04d}.png").write_bytes(b)
    (cal / ".hidden").write_text("skipped")
    out = tmp_path / "c.mar"
    assert main(["protect", mnist_mar, "--detector", ex.DETECTOR, "-o", str(out), "--calibrate", str(cal)]) == 0
    printed = capsys.readouterr().out
    assert "served calibration on 300 images" in printed and "held out" in printed
    # the distribution reference is rebuilt on the same path (the artifact has one): the served size recorded
    assert "distribution test: on, reference rebuilt on the served path (150 images, inputs 28x28" in printed
    manifest, files = read_archive(str(out))
    report = json.loads(files[f"{DETECTOR_DIR}/{CALIBRATION_FILE}"])
    embedded = json.loads(files[f"{DETECTOR_DIR}/reference.json"])
    assert (embedded["n"], embedded["input_sizes"], embedded["source"]) == (150, [[28, 28]], "served:cal")
    r = report["distribution_reference"]
    assert r["built_on"] == 150 and r["held_out_block"] == 150 and r["held_out_blocks_failed"] == 0, r
    assert (report["images"], report["calibrated_on"], report["held_out"]) == (300, 150, 150)
    assert report["flagged_share_calibration_after"] <= report["target_fpr"]
    artifact = read_spec(ex.DETECTOR)
    assert report["thresholds_before"] == {s.name: s.threshold for s in artifact.subdetectors}
    assert report["thresholds_after"] != report["thresholds_before"]  # so the checks below tell them apart
    extracted = tmp_path / "x"
    for name, data in files.items():
        p = extracted / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    det = load_detector(str(extracted / DETECTOR_DIR)).eval()
    assert dict(zip(det.names, det.thresholds.tolist())) == pytest.approx(report["thresholds_after"])
    monkeypatch.setenv("GUARDIAN_STATE_DIR", str(tmp_path / "state"))
    with archive_handler(manifest, files) as worker:  # the protected archive loaded as a worker loads it
        served = worker.guard.guardian.detector
        assert dict(zip(served.names, served.thresholds.tolist())) == pytest.approx(report["thresholds_after"])
        test = worker.guard.guardian.distribution
        assert test is not None and not test.off and test.reference.input_sizes == [[28, 28]]
    with archive_handler(*read_archive(mnist_mar)) as handler:  # the guarded handler's inner preprocess
        x = torch.cat([handler.preprocess([{"body": b}]) for b in bodies[0::2]])
        probs = torch.softmax(handler.inference(x), 1)
    flagged, scores = det.flag(det.to_pixels(x))
    assert float(flagged.float().mean()) == pytest.approx(report["flagged_share_calibration_after"])
    # the reference is what the worker's guard sees on the calibration half, at the new thresholds
    from guardian_plugin.distribution import build_reference
    from guardian_plugin.nuisance import DEFAULT_ENVELOPE
    again = build_reference(probs, scores, det.thresholds)
    assert again.conf_edge == pytest.approx(embedded["conf_edge"], abs=1e-5)
    assert again.groups == embedded["groups"]
    # the embedded rates cover the envelope too (each nuisance on the first ENVELOPE_IMAGES of the half)
    as_is = embedded["meta"]["rates_by_set"]["as_is"]["upper_by_group"]
    assert again.rates == pytest.approx(as_is, abs=1e-4) and all(r >= a - 1e-9 for r, a in zip(embedded["rates"], as_is))
    assert set(embedded["envelope"]) == set(DEFAULT_ENVELOPE)
    assert read_spec(ex.DETECTOR) == artifact

    few = tmp_path / "few"
    few.mkdir()
    for i, b in enumerate(bodies[:150]):
        (few / f"{i}.png").write_bytes(b)
    assert main(["protect", mnist_mar, "--detector", ex.DETECTOR, "-o", str(tmp_path / "f.mar"), "--calibrate", str(few)]) == 2
    assert "150 files, but a target false-positive rate of 0.01 needs at least 200" in capsys.readouterr().err
    # what the error suggests: 40 files, 5 uploads each (the file and 4 crops), each file's in one half
    forty = tmp_path / "forty"
    forty.mkdir()
    for i, b in enumerate(bodies[:40]):
        (forty / f"{i:02d}.png").write_bytes(b)
    assert main(["protect", mnist_mar, "--detector", ex.DETECTOR, "-o", str(tmp_path / "g.mar"), "--calibrate",
                 str(forty)]) == 2
    assert "--calibrate-crops 5 (40 x 5 = 200" in capsys.readouterr().err
    assert main(["protect", mnist_mar, "--detector", ex.DETECTOR, "-o", str(tmp_path / "h.mar"), "--calibrate",
                 str(forty), "--calibrate-crops", "5"]) == 0
    assert "served calibration on 200 images" in capsys.readouterr().out
    crops = json.loads(read_archive(str(tmp_path / "h.mar"))[1][f"{DETECTOR_DIR}/{CALIBRATION_FILE}"])
    assert (crops["images"], crops["held_out"], crops["crops_per_file"]) == (200, 100, 5)
    assert main(["protect", mnist_mar, "--detector", ex.DETECTOR, "-o", str(tmp_path / "i.mar"),
                 "--calibrate-crops", "5"]) == 2
    assert "pass --calibrate DIR too" in capsys.readouterr().err
    (cal / "notes.txt").write_text("not an image")
    assert main(["protect", mnist_mar, "--detector", ex.DETECTOR, "-o", str(tmp_path / "n.mar"), "--calibrate", str(cal)]) == 2
    assert "calibration image notes.txt: the preprocess cannot take it" in capsys.readouterr().err
    assert main(["protect", mnist_mar, "--detector", ex.DETECTOR, "-o", str(tmp_path / "m.mar"),
                 "--calibrate", str(tmp_path / "missing")]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert not any((tmp_path / n).exists() for n in ("f.mar", "g.mar", "i.mar", "n.mar", "m.mar"))
