"""The TorchServe adapter's settings: the ``handler: guardian:`` section of an archive's model-config.yaml.

    handler:
      guardian:
        guard:                         # a GuardConfig (guardian_plugin.config), detector path relative
          detector: guardian/detector  # to the extracted archive
          ledger: sqlite:///var/lib/guardian/ledger.db
          namespace: mnist
          rule: {tau: auto, rho: 0.5}
          identity: {headers: [X-Client-Id], missing: anonymous}
        wrap: image_classifier         # GuardedHandler only: the original handler (built-in name or file)
        output: auto                   # what the original inference returns: auto | logits | probabilities
        max_image_pixels: 12000000     # larger images: 400 before decoding (default: guard's, 12 MP)
        max_input_ratio: 4             # inputs > 4x the probed model input: 400 before inference (0: off)

Ledger paths: a relative ``sqlite://`` path is taken relative to ``$GUARDIAN_STATE_DIR`` (default
``~/.local/state/guardian-plugin``), never to the worker's working directory, which TorchServe
creates afresh for every start. ``$GUARDIAN_LEDGER`` overrides the ledger URI of every archive.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from guardian_plugin.config import GuardConfig, parse_config
from guardian_plugin.errors import ConfigError

SECTION = "guardian"
DEFAULT_STATE_DIR = os.path.join("~", ".local", "state", "guardian-plugin")


class AdapterSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    guard: Dict[str, Any]
    wrap: Optional[str] = None
    output: Literal["auto", "logits", "probabilities"] = "auto"
    max_image_pixels: Optional[int] = Field(None, ge=1)  # default: the guard config's (12 MP)
    # a preprocessed input larger than this many times what the model took when probed at load -> 400
    # before inference (a small PNG of many pixels must not hold a worker for seconds); 0: off
    max_input_ratio: float = Field(4.0, ge=0.0)


def state_dir() -> str:
    return os.path.abspath(os.path.expanduser(os.environ.get("GUARDIAN_STATE_DIR") or DEFAULT_STATE_DIR))


def resolve_ledger(uri: str) -> str:
    """Make a relative SQLite ledger path absolute (under the state directory)."""
    uri = os.environ.get("GUARDIAN_LEDGER") or uri
    if "://" not in uri:
        uri = "sqlite://" + uri  # a bare path: /abs -> sqlite:///abs, rel -> sqlite://rel
    if uri.startswith("sqlite://") and not uri.startswith("sqlite:///"):
        rel = uri[len("sqlite://"):]
        uri = "sqlite:///" + os.path.join(state_dir(), rel).lstrip("/")
    return uri


def read_settings(model_yaml_config: Optional[dict], model_dir: str, source: str = "model-config.yaml"):
    """(AdapterSettings, GuardConfig) from a worker's ``context.model_yaml_config``."""
    handler = (model_yaml_config or {}).get("handler") or {}
    raw = handler.get(SECTION) if isinstance(handler, dict) else None
    if raw is None:
        raise ConfigError(f"{source}: no `handler: {SECTION}:` section; protect the archive with "
                          f"`guardian protect` or add the section by hand (docs/torchserve.md)")
    try:
        settings = AdapterSettings.model_validate(raw)
    except ValidationError as e:
        fields = "; ".join(f"handler.{SECTION}.{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise ConfigError(f"{source}: {fields}") from None
    cfg: GuardConfig = parse_config(settings.guard, f"{source} handler.{SECTION}.guard", base_dir=model_dir)
    cfg.ledger = resolve_ledger(cfg.ledger)
    return settings, cfg


def build_image_processing(spec: dict):
    """torchvision preprocessing from ``handler: image_processing:`` (GuardedImageClassifier)::

        image_processing: {resize: 256, center_crop: 224, grayscale: false,
                           mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225]}
    Keys left out take TorchServe ImageClassifier's values; ``null`` drops a step."""
    from torchvision import transforms

    allowed = {"resize", "center_crop", "grayscale", "mean", "std"}
    unknown = set(spec) - allowed
    if unknown:
        raise ConfigError(f"model-config.yaml handler.image_processing: unknown keys {sorted(unknown)}; "
                          f"allowed: {sorted(allowed)}")
    steps = []
    if spec.get("grayscale", False):
        steps.append(transforms.Grayscale(1))
    if spec.get("resize", 256) is not None:
        steps.append(transforms.Resize(int(spec.get("resize", 256))))
    if spec.get("center_crop", 224) is not None:
        steps.append(transforms.CenterCrop(int(spec.get("center_crop", 224))))
    steps.append(transforms.ToTensor())
    mean = spec.get("mean", [0.485, 0.456, 0.406])
    std = spec.get("std", [0.229, 0.224, 0.225])
    if mean is not None and std is not None:
        steps.append(transforms.Normalize(mean=list(mean), std=list(std)))
    return transforms.Compose(steps)


def load_handler_class(handler: str, model_dir: str):
    """The handler class an archive names, resolved the way TorchServe's worker does: a module (a file
    in the archive, ``.py`` optional) first, then a built-in name under ts.torch_handler."""
    import importlib
    import sys

    from ts.utils.util import list_classes_from_module

    if not handler:
        raise ConfigError("model-config.yaml handler.guardian.wrap: the original handler is not set")
    if ":" in handler:
        raise ConfigError(f"handler {handler!r} is a function entry point; the guard needs a handler class "
                          "with preprocess/inference/postprocess (BaseHandler's template methods)")
    name = handler[:-3] if handler.endswith(".py") else handler
    name = name.split("/")[-1]
    if model_dir and model_dir not in sys.path:
        sys.path.append(model_dir)
    try:
        module = importlib.import_module(name)
    except ImportError:
        try:
            module = importlib.import_module("." + name, "ts.torch_handler")
        except ImportError as e:
            raise ConfigError(f"handler {handler!r}: neither a module in the archive nor a TorchServe built-in ({e})")
    classes = list_classes_from_module(module)
    if len(classes) != 1:
        raise ConfigError(f"handler {handler!r}: expected exactly one handler class in {module.__name__}, "
                          f"found {[c.__name__ for c in classes]}")
    return classes[0]
