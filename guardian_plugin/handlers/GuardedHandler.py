"""``handler: guardian_plugin.handlers.GuardedHandler``: guards an archive's own handler.

The original handler (``handler: guardian: wrap:`` in model-config.yaml: a TorchServe built-in name
such as ``image_classifier``, or the archive's own handler file) is loaded and initialised unchanged;
its preprocess, inference and postprocess serve every request, with Model-Guardian between inference
and postprocess (guardian_plugin.handlers.guard). ``guardian protect`` writes this handler into an
archive. This module defines exactly one class, as TorchServe's worker requires.
"""

from guardian_plugin.handlers.guard import build_guard
from guardian_plugin.handlers.settings import load_handler_class, read_settings


class GuardedHandler:
    def __init__(self):
        self.inner = None
        self.guard = None
        self.initialized = False

    def initialize(self, context):
        model_dir = context.system_properties.get("model_dir") or "."
        settings, _ = read_settings(getattr(context, "model_yaml_config", None), model_dir)
        cls = load_handler_class(settings.wrap, model_dir)
        self.inner = cls()
        self.inner.initialize(context)
        self.guard = build_guard(self.inner, context)
        self.initialized = True

    def handle(self, data, context):
        self.inner.context = context
        return self.guard.handle(data, context)
