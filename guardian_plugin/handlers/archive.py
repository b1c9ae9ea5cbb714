"""Rewriting TorchServe model archives (.mar): ``guardian protect`` and its building block.

A .mar built by torch-model-archiver is a zip file: the model's files at the top level and
``MAR-INF/MANIFEST.json``, whose ``model.handler`` names the handler (a built-in name such as
``image_classifier``, or the handler file the archiver copied in) and whose ``model.configFile``
names the model-config.yaml the worker reads into ``context.model_yaml_config``.

``protect`` keeps every file of the archive, switches the handler to
``guardian_plugin.handlers.GuardedHandler``, records the original handler under
``handler: guardian: wrap:``, copies the detector artifact to ``guardian/detector/`` inside the
archive and writes the guard settings beside it. No code of the original archive changes.
"""

from __future__ import annotations

import contextlib
import json
import os
import zipfile
from typing import Dict, List, Optional, Tuple

import numpy as np
import yaml

from guardian_plugin.config import parse_config
from guardian_plugin.errors import ConfigError, GuardianError

MANIFEST = "MAR-INF/MANIFEST.json"
GUARDED_HANDLER = "guardian_plugin.handlers.GuardedHandler"
GUARDED_IMAGE_CLASSIFIER = "guardian_plugin.handlers.GuardedImageClassifier"
DETECTOR_DIR = "guardian/detector"
DEFAULT_MODEL_CONFIG = "model-config.yaml"


class ArchiveError(GuardianError):
    """The input is not a model archive this tool can rewrite."""


def read_archive(path: str) -> Tuple[dict, Dict[str, bytes]]:
    """(manifest, {name: bytes}) of a zip-format .mar."""
    if not os.path.isfile(path):
        raise ArchiveError(f"{path}: no such archive")
    if not zipfile.is_zipfile(path):
        raise ArchiveError(f"{path}: not a zip-format model archive (build it with torch-model-archiver's "
                           "default --archive-format)")
    with zipfile.ZipFile(path) as z:
        files = {i.filename: z.read(i) for i in z.infolist() if not i.is_dir()}
    if MANIFEST not in files:
        raise ArchiveError(f"{path}: {MANIFEST} is missing: not a TorchServe model archive")
    try:
        manifest = json.loads(files[MANIFEST])
        manifest["model"]["handler"]
    except (ValueError, KeyError, TypeError) as e:
        raise ArchiveError(f"{path}: {MANIFEST} is not a valid manifest ({e})") from None
    return manifest, files


def archive_guard_config(path: str):
    """The guard config (GuardConfig) a `guardian protect`ed archive embeds: its ledger, namespace (the
    model's name unless the config gave one), rule and identity, for the operator tools
    (``guardian clients|keys ... --archive MAR``)."""
    from guardian_plugin.handlers.settings import read_settings

    manifest, files = read_archive(path)
    name, cfg = model_config(manifest, files)
    return read_settings(cfg, os.path.dirname(os.path.abspath(path)), source=f"{path}: {name}")[1]


def write_archive(path: str, manifest: dict, files: Dict[str, bytes]) -> str:
    files = dict(files)
    files[MANIFEST] = json.dumps(manifest, indent=2).encode()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
        for name in sorted(files):
            z.writestr(name, files[name])
    os.replace(tmp, path)
    return path


def model_config(manifest: dict, files: Dict[str, bytes]) -> Tuple[str, dict]:
    """(file name, parsed model-config.yaml) of an archive; an empty mapping when it has none."""
    name = manifest["model"].get("configFile") or DEFAULT_MODEL_CONFIG
    raw = files.get(name)
    if raw is None:
        return name, {}
    try:
        cfg = yaml.safe_load(raw) or {}
    except yaml.YAMLError as e:
        raise ArchiveError(f"{name} inside the archive is not valid YAML ({e})") from None
    if not isinstance(cfg, dict):
        raise ArchiveError(f"{name} inside the archive is not a mapping")
    return name, cfg


# the printed config.properties line's batch settings where the archive's model-config.yaml sets none
DEFAULT_BATCH = {"batchSize": 8, "maxBatchDelay": 50, "responseTimeout": 120}
BATCH_KEYS = ("minWorkers", "maxWorkers", "batchSize", "maxBatchDelay", "responseTimeout")


def models_entry(manifest: dict, files: Dict[str, bytes], mar_file: str) -> Tuple[str, str]:
    """(``--models`` argument, ``models=`` line of config.properties) that serve the archive ``mar_file``
    under its own model name with batching. TorchServe 0.12 reads a model's batch size, batch delay and
    workers at start only from a ``models=`` entry keyed by the name the model is served under (the
    ``NAME=`` of ``--models``, or the archive's model name when there is none) and by its version: an
    entry under any other key, the .mar's file name say, is silently ignored and the model runs with
    batch size 1 (checked against a real TorchServe 0.12). The settings are those of the archive's
    model-config.yaml where it sets them (workers too), else DEFAULT_BATCH (workers: TorchServe's
    default_workers_per_model)."""
    name = manifest["model"].get("modelName") or os.path.splitext(os.path.basename(mar_file))[0]
    version = str(manifest["model"].get("modelVersion") or "1.0")
    cfg = model_config(manifest, files)[1]
    settings = {"defaultVersion": True, "marName": os.path.basename(mar_file)}
    settings.update({k: cfg[k] if k in cfg else DEFAULT_BATCH[k] for k in BATCH_KEYS if k in cfg or k in DEFAULT_BATCH})
    return f"{name}={os.path.basename(mar_file)}", "models=" + json.dumps({name: {version: settings}})


def rewrite_archive(in_mar: str, out_mar: str, handler: Optional[str] = None, handler_config: Optional[dict] = None,
                    extra_files: Optional[Dict[str, bytes]] = None) -> dict:
    """Copy an archive, switching its handler, merging keys into model-config's ``handler:`` section and
    adding files. Returns the new manifest."""
    manifest, files = read_archive(in_mar)
    cfg_name, cfg = model_config(manifest, files)
    if handler_config:
        section = cfg.get("handler") or {}
        if not isinstance(section, dict):
            raise ArchiveError(f"{cfg_name}: `handler:` is not a mapping")
        section.update(handler_config)
        cfg["handler"] = section
        files[cfg_name] = yaml.safe_dump(cfg, sort_keys=False).encode()
        manifest["model"]["configFile"] = cfg_name
    if handler:
        manifest["model"]["handler"] = handler
    files.update(extra_files or {})
    write_archive(out_mar, manifest, files)
    return manifest


class _LoadContext:
    """The part of TorchServe's worker context a handler's ``initialize`` reads."""

    def __init__(self, model_dir: str, manifest: dict, model_yaml_config: dict):
        self.system_properties = {"model_dir": model_dir, "gpu_id": None, "batch_size": 1,
                                  "limit_max_image_pixels": True}
        self.manifest = manifest
        self.model_yaml_config = model_yaml_config
        self.metrics = None


def load_archive_handler(manifest: dict, files: Dict[str, bytes], model_dir: str):
    """The archive's own handler, initialised as a TorchServe worker would (the archive extracted into
    ``model_dir``). Its modules stay imported: call it in a process of its own, or see probe_archive."""
    from guardian_plugin.handlers.settings import load_handler_class

    root = os.path.realpath(model_dir)
    for name, data in files.items():
        path = os.path.realpath(os.path.join(root, name))
        if not path.startswith(root + os.sep):
            raise ArchiveError(f"archive member {name!r} lies outside the archive")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
    handler = load_handler_class(manifest["model"]["handler"], root)()
    handler.initialize(_LoadContext(root, manifest, model_config(manifest, files)[1]))
    return handler


@contextlib.contextmanager
def archive_handler(manifest: dict, files: Dict[str, bytes]):
    """The archive's own handler (load_archive_handler) for the ``with`` block, extracted into a temporary
    directory; the archive's modules are forgotten afterwards (another archive may have a module of the
    same name)."""
    import shutil
    import sys
    import tempfile

    tmp = os.path.realpath(tempfile.mkdtemp(prefix="guardian-probe-"))
    try:
        yield load_archive_handler(manifest, files, tmp)
    finally:
        for name, mod in list(sys.modules.items()):
            if (getattr(mod, "__file__", None) or "").startswith(tmp + os.sep):
                del sys.modules[name]
        if tmp in sys.path:
            sys.path.remove(tmp)
        shutil.rmtree(tmp, ignore_errors=True)


def probe_archive(manifest: dict, files: Dict[str, bytes], size: int = 64, num_classes: Optional[int] = None):
    """(model, label answers): guardian_plugin.fit.probe_handler on the archive's own handler, and what
    its postprocess answers a probe of two score rows (guard.probe_label_answers: the two labels when it
    answers labels only, else None; ``num_classes`` wide, default the probed model's)."""
    from guardian_plugin.fit import probe_handler
    from guardian_plugin.handlers.guard import probe_label_answers

    try:
        with archive_handler(manifest, files) as handler:
            model = probe_handler(handler, size=size)
            return model, probe_label_answers(handler, num_classes or model.num_classes or 10)
    except GuardianError:
        raise
    except Exception as e:  # the archive's own code failed to load: same override as a mismatch
        from guardian_plugin.errors import ModelMismatch
        from guardian_plugin.fit import OVERRIDE_HINT

        raise ModelMismatch(f"cannot load the archive's handler to probe its model ({type(e).__name__}: {e}); "
                            f"{OVERRIDE_HINT}") from e


def _check_fit(manifest: dict, files: Dict[str, bytes], spec, allow_mismatch: bool):
    """(ModelSpec or None, problems, label answers or None): the archive's model probed and checked
    against the detector's spec (guardian_plugin.fit; ModelMismatch unless ``allow_mismatch``), and its
    postprocess probed for label-only answers (probe_archive)."""
    from guardian_plugin.fit import check_fit

    try:
        model, labels = probe_archive(manifest, files, size=spec.image.size, num_classes=spec.num_classes)
    except GuardianError as e:
        if not allow_mismatch:
            raise
        return None, [str(e)], None
    return model, check_fit(spec, model, allow_mismatch), labels


def _detector_files(detector_dir: str) -> Dict[str, bytes]:
    from guardian_plugin.detector import load_detector

    load_detector(detector_dir)  # fails now, naming the file, rather than in every worker later
    out = {}
    for root, _, names in os.walk(detector_dir):
        for n in sorted(names):
            p = os.path.join(root, n)
            rel = os.path.relpath(p, detector_dir).replace(os.sep, "/")
            with open(p, "rb") as f:
                out[f"{DETECTOR_DIR}/{rel}"] = f.read()
    return out


def _edit_detector_yaml(detector_files: Dict[str, bytes], edit) -> Dict[str, bytes]:
    """A copy of the embedded detector files whose detector.yaml went through ``edit(raw dict)``."""
    from guardian_plugin.detector import DETECTOR_YAML

    name = f"{DETECTOR_DIR}/{DETECTOR_YAML}"
    raw = yaml.safe_load(detector_files[name])
    edit(raw)
    return {**detector_files, name: yaml.safe_dump(raw, sort_keys=False).encode()}


def _with_input_fit(spec, detector_files: Dict[str, bytes], input_fit: str):
    """(spec, files) with the embedded copy's ``input.fit`` set to ``input_fit``; the artifact on disk
    is not touched."""
    from guardian_plugin.detector import with_input_fit

    spec = with_input_fit(spec, input_fit)
    return spec, _edit_detector_yaml(detector_files, lambda raw: raw.__setitem__("input", spec.input.model_dump()))


def served_calibration(manifest: dict, files: Dict[str, bytes], detector_dir: str, spec,
                       detector_files: Dict[str, bytes], image_dir: str, output: str = "auto",
                       reference_block: Optional[int] = None, crops: int = 1) -> Tuple[Dict[str, bytes], dict]:
    """(detector files with new thresholds, report): guardian_plugin.recalibrate on the archive's own
    preprocess (``preprocess([{"body": bytes}])``, as a worker calls it) and the artifact as embedded
    (``spec``'s input fit), exactly what the guard scores; the report is embedded beside detector.yaml.
    The thresholds may move either way, and higher ones flag fewer attack queries too.

    ``reference_block`` (the guard's distribution.block; None: no reference): the distribution test's
    reference is rebuilt on the same path, with the archive's own inference giving the probabilities as
    a worker's guard sees them (``output``), and replaces the embedded reference.json: it then
    describes the served inputs (their size recorded), and matches the new thresholds."""
    from guardian_plugin.handlers.guard import output_kind, to_probabilities
    from guardian_plugin.recalibrate import (CALIBRATION_FILE, calibration_set, envelope_uploads, load_fitted,
                                             recalibrate, served_features, served_reference, set_thresholds)

    images, held = calibration_set(image_dir, float(spec.target_fpr), crops, "--calibrate-crops")
    detector = load_fitted(detector_dir, spec.input.fit)
    with archive_handler(manifest, files) as handler:
        def infer(x):
            out = handler.inference(x)
            return to_probabilities(out, output_kind(out, output))

        preprocess = lambda body: handler.preprocess([{"body": body}])  # noqa: E731
        scores, probs, sizes = served_features(detector, preprocess, images, infer=infer if reference_block else None)
        envelope = {}
        if reference_block:  # the reference's benign envelope, through the same preprocess and model
            for nz, (ups, rows) in envelope_uploads(images, np.flatnonzero(~held), _envelope_of(detector_dir),
                                                      ENVELOPE_IMAGES).items():
                sc, pr, _ = served_features(detector, preprocess, ups, infer=infer)
                envelope[nz] = (sc, pr, rows)
    thresholds, report = recalibrate(detector, scores, float(spec.target_fpr), held,
                                     image_dir=os.path.abspath(image_dir), crops_per_file=crops)
    out = _edit_detector_yaml(detector_files, lambda raw: set_thresholds(raw, thresholds))
    if reference_block:
        from guardian_plugin.distribution import REFERENCE_FILE

        ref, report["distribution_reference"] = served_reference(
            scores, probs, thresholds, sizes, reference_block, f"served:{os.path.basename(os.path.abspath(image_dir))}",
            held, envelope)
        out[f"{DETECTOR_DIR}/{REFERENCE_FILE}"] = ref.to_json().encode()
    out[f"{DETECTOR_DIR}/{CALIBRATION_FILE}"] = (json.dumps(report, indent=1) + "\n").encode()
    return out, report


def protect(in_mar: str, detector_dir: str, out_mar: str, config: Optional[str] = None, ledger: Optional[str] = None,
            namespace: Optional[str] = None, output: str = "auto", max_image_pixels: Optional[int] = None,
            allow_mismatch: bool = False, input_fit: Optional[str] = None, calibrate: Optional[str] = None,
            calibrate_crops: int = 1) -> dict:
    """Rewrite ``in_mar`` into a guarded ``out_mar`` (see the module docstring). Returns a summary.
    The archive's model is probed first (guardian_plugin.fit): a detector trained for other inputs or
    another class count raises ModelMismatch unless ``allow_mismatch`` (then written into the guard
    settings, so that the workers load too). ``input_fit`` (center_crop | resize | area) replaces the
    artifact's ``input.fit`` in the embedded copy: how the model's larger preprocessed input is brought
    to the detector's size (e.g. ``area`` for a 224 px handler in front of a 32 px detector). ``calibrate``:
    a folder of benign images (request bodies) on which the embedded copy's thresholds are re-set through
    the archive's own preprocess (served_calibration; the summary's ``calibration`` is its report)."""
    manifest, files = read_archive(in_mar)
    original = manifest["model"]["handler"]
    if original.startswith("guardian_plugin.handlers."):
        raise ArchiveError(f"{in_mar} is already guarded (handler {original})")
    if ":" in original:
        raise ArchiveError(f"{in_mar}: handler {original!r} is a function entry point; the guard wraps handler "
                           "classes (preprocess/inference/postprocess), see docs/torchserve.md")
    guard: dict = {}
    if config:
        if not os.path.exists(config):
            raise ConfigError(f"{config}: no such config file")
        with open(config) as f:
            try:
                guard = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"{config}: not valid YAML ({e})") from None
        if not isinstance(guard, dict):
            raise ConfigError(f"{config}: expected a mapping at the top level")
    guard = dict(guard)
    guard["detector"] = DETECTOR_DIR
    if ledger:
        guard["ledger"] = ledger
    if namespace:
        guard["namespace"] = namespace
    elif guard.get("namespace", "default") == "default":
        guard["namespace"] = manifest["model"].get("modelName") or "default"
    if allow_mismatch:
        guard["allow_mismatch"] = True
    cfg = parse_config(guard, config or "guard settings")  # validate now; names the bad field
    from guardian_plugin.detector import read_spec

    detector_files = _detector_files(detector_dir)
    spec = read_spec(detector_dir)
    if input_fit:
        spec, detector_files = _with_input_fit(spec, detector_files, input_fit)
    model, problems, labels = _check_fit(manifest, files, spec, cfg.allow_mismatch)
    label_only = None
    if labels is not None:  # what each worker will also log at load (guard.label_only_response)
        from guardian_plugin.handlers.guard import label_only_message, label_response

        k = spec.num_classes or (model.num_classes if model is not None else None) or 10
        label_only = label_only_message(labels, label_response(cfg, k))
    calibration = None
    if calibrate_crops != 1 and not calibrate:
        raise ConfigError(f"--calibrate-crops {calibrate_crops}: it sets how many uploads each file of --calibrate "
                          "DIR gives; pass --calibrate DIR too")
    if calibrate:
        detector_files, calibration = served_calibration(manifest, files, detector_dir, spec, detector_files,
                                                          calibrate, output, _reference_block(cfg, detector_dir),
                                                          crops=calibrate_crops)
    distribution = _distribution_summary(cfg, detector_dir, spec, model, calibration)
    settings = {"guard": cfg.model_dump(), "wrap": original, "output": output}
    settings["guard"]["detector"] = DETECTOR_DIR  # relative to the extracted archive
    if max_image_pixels:
        settings["max_image_pixels"] = int(max_image_pixels)
    new = rewrite_archive(in_mar, out_mar, GUARDED_HANDLER, {"guardian": settings}, detector_files)
    load, models_line = models_entry(new, files, out_mar)
    return {"archive": out_mar, "model": new["model"].get("modelName"), "handler": GUARDED_HANDLER,
            "models_arg": load, "models_line": models_line,
            "wraps": original, "ledger": cfg.ledger, "namespace": cfg.namespace, "input_fit": spec.input.fit,
            "fit": model.describe() if model else "not probed", "mismatch": problems, "label_only": label_only,
            "calibration": calibration, "distribution": distribution, "trained_against": trained_against(detector_dir)}


def trained_against(detector_dir: str) -> str:
    """Which victim the detector artifact was trained against (its report.json's training config), and
    what reusing it for another model means; what `guardian protect` prints."""
    try:
        with open(os.path.join(detector_dir, "report.json")) as f:
            victim = (json.load(f).get("config") or {}).get("victim") or {}
    except (OSError, ValueError):
        victim = {}
    if not victim.get("arch"):
        return (f"{detector_dir} records no victim (no report.json from `guardian train-detector`): its figures "
                "cannot be checked against this model")
    what = f"{victim['arch']}" + (f", {victim['num_classes']} classes" if victim.get("num_classes") else "")
    return (f"the detector was trained against the victim {what} (weights {victim.get('weights', '?')}): its sources "
            "that query a victim (dfme) and its figures in report.json (FPR, DAcc) are that model's; for another "
            "model they are not measured: check them on this archive with `--calibrate DIR` (the served FPR) "
            "and the evaluation harness, or train a detector whose config's `victim:` is this model "
            "(docs/detector.md)")


# calibration images (of the reference half) the served reference's envelope is measured on, per nuisance
ENVELOPE_IMAGES = 300


def _envelope_of(detector_dir: str) -> List[str]:
    """The nuisances the served reference's envelope covers: the artifact's own reference's, else the
    default (guardian_plugin.nuisance.DEFAULT_ENVELOPE)."""
    from guardian_plugin.distribution import load_reference
    from guardian_plugin.errors import ArtifactError
    from guardian_plugin.nuisance import DEFAULT_ENVELOPE

    try:
        ref = load_reference(detector_dir)
    except ArtifactError:  # an earlier format: it is being rebuilt here anyway
        ref = None
    return list(ref.envelope) if ref is not None and ref.envelope else list(DEFAULT_ENVELOPE)


def _reference_block(cfg, detector_dir: str) -> Optional[int]:
    """The block size to rebuild the distribution reference on the served path with (protect --calibrate):
    the guard's, when the test can be on (the artifact has reference.json, or ``enabled: true``); else None."""
    from guardian_plugin.distribution import REFERENCE_FILE

    d = cfg.distribution
    if d.enabled is False or (d.enabled == "auto" and not os.path.exists(os.path.join(detector_dir, REFERENCE_FILE))):
        return None
    return d.block


def _distribution_summary(cfg, detector_dir: str, spec, model, calibration) -> str:
    """One line: whether the distribution test will apply on this archive's served path (what each worker
    decides at load, Guardian.served_path, from the same probe)."""
    from guardian_plugin.distribution import DistributionTest, load_reference

    if cfg.distribution.enabled is False:
        return "off (distribution.enabled: false)"
    if calibration is not None and "distribution_reference" in calibration:
        r = calibration["distribution_reference"]
        return (f"on, reference rebuilt on the served path ({r['built_on']} images, inputs "
                f"{', '.join('x'.join(map(str, v)) for v in r['input_sizes'])}; held-out blocks failed: "
                f"{r['held_out_blocks_failed']} of {len(r['held_out_block_statistic'])}; envelope "
                f"{', '.join(r['envelope']) or 'none'} on {r['envelope_images']} images)")
    ref = load_reference(detector_dir)
    if ref is None:
        return "off (the detector artifact has no reference.json)"
    if model is None:
        return "on (the served path was not probed)"
    why = DistributionTest(ref).mismatch(model.height, model.width, spec.image.size)
    if not why:
        return "on at every input size (the reference describes the served path)"
    if cfg.distribution.enabled is True:
        return f"on (enabled: true) although {why}"
    return f"off (enabled: auto): {why}"
