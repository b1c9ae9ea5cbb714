"""`guardian calibrate`: a detector artifact copied with its thresholds re-set on a user's own preprocess
function (the BentoML route to what `guardian protect --calibrate` does for TorchServe archives)."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from guardian_plugin.cli import main  # noqa: E402
from guardian_plugin.detector import load_detector, read_spec  # noqa: E402
from guardian_plugin.recalibrate import CALIBRATION_FILE  # noqa: E402

# a user's preprocess: the digit scaled up 2x (as a service that resizes would), MNIST-normalised
PREPROCESS = '''
import numpy as np, torch
import torch.nn.functional as F

def preprocess(image):
    x = torch.from_numpy(np.asarray(image.convert("L"), dtype=np.float32) / 255.0)[None, None]
    x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    return ((x - 0.1307) / 0.3081)[0]

def broken(image):
    raise ValueError("cannot read this one")
'''


@pytest.fixture()
def setup(tmp_path, monkeypatch):
    from examples.mnist import serving as ex

    (tmp_path / "user_pre.py").write_text(PREPROCESS)
    monkeypatch.chdir(tmp_path)  # MODULE:FUNCTION resolves from the current directory, as `python -m` does
    bodies, _ = ex.real_digits(240)
    images = tmp_path / "images"
    images.mkdir()
    for i, b in enumerate(bodies):
        (images / f"{i:04d}.png").write_bytes(b)
    yield ex.DETECTOR, images, bodies
    sys.modules.pop("user_pre", None)


def test_calibrate_writes_a_new_artifact_with_served_thresholds(tmp_path, setup, capsys):
    detector, images, bodies = setup
    before = read_spec(detector)
    out = tmp_path / "calibrated"
    assert main(["calibrate", "--detector", detector, "--images", str(images), "--preprocess", "user_pre:preprocess",
                 "--input-fit", "area", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}: served calibration on 240 images through user_pre:preprocess (input fit area" in printed
    report = json.loads((out / CALIBRATION_FILE).read_text())
    assert (report["images"], report["calibrated_on"], report["held_out"]) == (240, 120, 120)
    assert report["preprocess"] == "user_pre:preprocess" and report["source_artifact"] == os.path.abspath(detector)
    assert report["thresholds_before"] == {s.name: s.threshold for s in before.subdetectors}
    assert report["thresholds_after"] != report["thresholds_before"]
    spec = read_spec(str(out))
    assert spec.input.fit == "area" and {s.name: s.threshold for s in spec.subdetectors} == pytest.approx(report["thresholds_after"])
    assert read_spec(detector) == before  # the source artifact is untouched
    # the new artifact, fed the same preprocess, flags at most the target share of the calibration half
    from PIL import Image
    import io
    import user_pre

    det = load_detector(str(out)).eval()
    x = torch.stack([user_pre.preprocess(Image.open(io.BytesIO(b))) for b in bodies[0::2]])
    flagged, _ = det.flag(det.to_pixels(x))
    assert float(flagged.float().mean()) == pytest.approx(report["flagged_share_calibration_after"])
    assert report["flagged_share_calibration_after"] <= report["target_fpr"]
    assert np.isfinite(list(report["thresholds_after"].values())).all()


def test_calibrate_errors_name_the_problem(tmp_path, setup, capsys):
    detector, images, _ = setup
    args = ["calibrate", "--detector", detector, "--images", str(images)]
    assert main(args + ["--preprocess", "user_pre:broken", "-o", str(tmp_path / "a")]) == 2
    assert "calibration image 0000.png: the preprocess cannot take it (ValueError: cannot read this one)" in capsys.readouterr().err
    assert main(args + ["--preprocess", "user_pre", "-o", str(tmp_path / "b")]) == 2
    assert "expected MODULE:FUNCTION" in capsys.readouterr().err
    assert main(args + ["--preprocess", "user_pre:missing", "-o", str(tmp_path / "c")]) == 2
    assert "AttributeError" in capsys.readouterr().err
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("taken")
    assert main(args + ["--preprocess", "user_pre:preprocess", "-o", str(full)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    few = tmp_path / "few"
    few.mkdir()
    for p in sorted(images.iterdir())[:10]:
        (few / p.name).write_bytes(p.read_bytes())
    assert main(["calibrate", "--detector", detector, "--images", str(few), "--preprocess", "user_pre:preprocess",
                 "-o", str(tmp_path / "d")]) == 2
    assert "10 files, but a target false-positive rate of 0.01 needs at least 200" in capsys.readouterr().err
    assert not any((tmp_path / n).exists() for n in ("a", "b", "c", "d"))
    assert yaml.safe_load((full / "x").read_text()) == "taken"


def test_few_images_error_says_how_many_crops_and_crops_calibrate(tmp_path, setup, capsys):
    """40 files at a 1% target: the error gives the statistical reason and the option that makes 200
    uploads of them; with it, each file's crops stay in one half (the held-out share is on other files)."""
    from PIL import Image
    import io

    from guardian_plugin.recalibrate import photo_crops

    detector, images, _ = setup
    few = tmp_path / "forty"
    few.mkdir()
    for p in sorted(images.iterdir())[:40]:
        (few / p.name).write_bytes(p.read_bytes())
    args = ["calibrate", "--detector", detector, "--images", str(few), "--preprocess", "user_pre:preprocess",
            "--input-fit", "area"]
    assert main(args + ["-o", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "40 files, but a target false-positive rate of 0.01 needs at least 200" in err
    assert "99% quantile of the calibrating half's scores, which needs 100 images" in err
    assert "--crops 5 (40 x 5 = 200" in err and not (tmp_path / "a").exists()
    assert main(args + ["--crops", "4", "-o", str(tmp_path / "b")]) == 2
    assert "40 files x 4 crops = 160 images" in capsys.readouterr().err
    assert main(args + ["--crops", "5", "-o", str(tmp_path / "c")]) == 0
    report = json.loads((tmp_path / "c" / CALIBRATION_FILE).read_text())
    assert (report["images"], report["calibrated_on"], report["held_out"], report["crops_per_file"]) == (200, 100, 100, 5)
    # the uploads: the file itself, then crops of it as PNG, every one of a file in the same half
    files = [(p.name, p.read_bytes()) for p in sorted(few.iterdir())]
    uploads, held = photo_crops(files, 5)
    assert [n for n, _ in uploads[:5]] == ["0000.png"] + [f"0000.png#crop{k}" for k in range(1, 5)]
    assert uploads[0][1] == files[0][1]
    crops = [Image.open(io.BytesIO(b)) for _, b in uploads[1:5]]
    assert all(c.format == "PNG" and c.size == (28, 28) for c in crops)  # zooms, at the file's own size
    original = np.asarray(Image.open(io.BytesIO(files[0][1])))
    assert all(not np.array_equal(np.asarray(c), original) for c in crops)
    for i in range(40):
        assert len(set(held[5 * i:5 * i + 5])) == 1 and held[5 * i] == (i % 2 == 1)
