"""``handler: guardian_plugin.handlers.GuardedImageClassifier``: TorchServe's ImageClassifier, guarded.

Same preprocessing (override it with ``handler: image_processing:`` in model-config.yaml), same
response (top-k ``{label: probability}``, index_to_name.json honoured; ``handler: topk:``), with
Model-Guardian between inference and postprocess. This module defines exactly one class, as
TorchServe's worker requires of a handler given as a module path.
"""

from ts.torch_handler.image_classifier import ImageClassifier

from guardian_plugin.handlers.guard import build_guard
from guardian_plugin.handlers.settings import build_image_processing


class GuardedImageClassifier(ImageClassifier):
    def initialize(self, context):
        super().initialize(context)
        hcfg = (getattr(self, "model_yaml_config", None) or {}).get("handler") or {}
        if hcfg.get("image_processing"):
            self.image_processing = build_image_processing(hcfg["image_processing"])
        if hcfg.get("topk") is not None:
            self.set_max_result_classes(int(hcfg["topk"]))
        self.guard = build_guard(self, context)
        self.initialized = True

    def handle(self, data, context):
        self.context = context
        return self.guard.handle(data, context)
