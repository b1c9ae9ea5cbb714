"""The handler files shipped in the package, as torch-model-archiver users pass them:
``--handler "$(guardian handler-file image-classifier)"`` (real archiver; the literal manifest string
guardian_plugin.handlers.GuardedImageClassifier is served by a real TorchServe in test_torchserve.py)."""

from __future__ import annotations

import os
import sys

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from examples.mnist import serving as ex  # noqa: E402
from guardian_plugin.cli import main  # noqa: E402
from guardian_plugin.handlers.files import FILES  # noqa: E402


@pytest.mark.parametrize("name", sorted(FILES))
def test_handler_file_prints_an_absolute_path_inside_the_package(name, capsys):
    assert main(["handler-file", name]) == 0
    path = capsys.readouterr().out.strip()
    assert os.path.isabs(path) and os.path.isfile(path)
    assert os.path.dirname(path) == os.path.join(ROOT, "handlers")  # the checkout's one copy


def test_the_top_level_handlers_folder_is_the_one_copy():
    shipped = sorted(FILES.values())
    assert sorted(f for f in os.listdir(os.path.join(ROOT, "handlers")) if f.endswith(".py")) == shipped
    copies = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(ROOT, "guardian_plugin")) for f in fs if f in shipped]
    assert copies == []


def test_the_wheel_ships_them_and_handler_file_finds_them_when_installed(tmp_path):
    """Built from this checkout, installed (no dependencies: they are this venv's) under a fresh prefix,
    and run from elsewhere: the printed paths are the installed data files, byte for byte the checkout's."""
    import glob
    import subprocess
    import sysconfig
    import zipfile

    subprocess.run([sys.executable, "-m", "pip", "wheel", ROOT, "-w", str(tmp_path / "whl"), "--no-deps",
                    "--no-build-isolation", "-q"], check=True, cwd=tmp_path)
    wheel = glob.glob(str(tmp_path / "whl" / "guardian_plugin-*.whl"))[0]
    names = zipfile.ZipFile(wheel).namelist()
    for f in FILES.values():
        assert any(n.endswith(f".data/data/share/guardian-plugin/handlers/{f}") for n in names), names
    assert not [n for n in names if n.startswith("handlers/")]  # not a top-level Python package
    prefix = tmp_path / "prefix"
    from importlib import metadata

    # --ignore-installed: without it pip uninstalls this environment's guardian-plugin before installing under --prefix
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--ignore-installed", "--prefix", str(prefix),
                    "-q", wheel], check=True, cwd=tmp_path)
    metadata.distribution("guardian-plugin")  # this environment's install is still there (else PackageNotFoundError)
    site = sysconfig.get_path("purelib", vars={"base": str(prefix), "platbase": str(prefix)})
    env = {**os.environ, "PYTHONPATH": site}
    for name, f in FILES.items():
        out = subprocess.run([sys.executable, "-c", "import sys, guardian_plugin; from guardian_plugin.cli import main; "
                              "print(guardian_plugin.__file__); sys.exit(main(['handler-file', sys.argv[1]]))", name],
                             check=True, cwd=tmp_path, env=env, capture_output=True, text=True).stdout.split()
        assert out[0].startswith(site), out  # the installed package, not this checkout
        assert out[1] == str(prefix / "share" / "guardian-plugin" / "handlers" / f)
        assert open(out[1]).read() == open(os.path.join(ROOT, "handlers", f)).read()


def test_archive_built_with_the_printed_path_loads_as_a_worker_would(tmp_path, capsys, monkeypatch):
    pytest.importorskip("ts")
    from guardian_plugin.handlers.archive import DETECTOR_DIR, GUARDED_IMAGE_CLASSIFIER, load_archive_handler, read_archive
    from guardian_plugin.handlers.settings import load_handler_class
    from guardian_plugin.devserver.torchserve import build_archive

    assert main(["handler-file", "image-classifier"]) == 0
    handler = capsys.readouterr().out.strip()
    bundle = tmp_path / "bundle"  # the archiver copies a folder's contents
    os.makedirs(bundle / DETECTOR_DIR)
    for f in os.listdir(ex.DETECTOR):
        os.symlink(os.path.join(ex.DETECTOR, f), bundle / DETECTOR_DIR / f)
    cfg = tmp_path / "model-config.yaml"
    cfg.write_text(yaml.safe_dump({"handler": {
        "image_processing": {"resize": None, "center_crop": None, "mean": ex.MNIST_MEAN, "std": ex.MNIST_STD},
        "guardian": {"guard": {"detector": DETECTOR_DIR, "ledger": "memory://"}}}}))
    mar = build_archive("mnist", ex.VICTIM_TS, handler, str(tmp_path / "store"), config_file=str(cfg),
                        extra_files=[str(bundle)])
    manifest, files = read_archive(mar)
    assert manifest["model"]["handler"] == "guarded_image_classifier.py"
    assert "guarded_image_classifier.py" in files and f"{DETECTOR_DIR}/detector.yaml" in files
    guarded = load_archive_handler(manifest, files, str(tmp_path / "worker"))
    assert type(guarded).__name__ == "GuardedImageClassifierHandler" and guarded.guard is not None
    # the literal manifest string resolves to exactly one handler class, as TorchServe's worker needs
    assert load_handler_class(GUARDED_IMAGE_CLASSIFIER, str(tmp_path)).__name__ == "GuardedImageClassifier"
