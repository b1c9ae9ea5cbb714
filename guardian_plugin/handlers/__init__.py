"""TorchServe adapter.

Two handler modules, each a module with exactly one class, as TorchServe's worker requires of a
handler string without ``:``:

- ``guardian_plugin.handlers.GuardedImageClassifier``: TorchServe's ImageClassifier with the guard.
- ``guardian_plugin.handlers.GuardedHandler``: wraps any archive's own handler (a built-in name such
  as ``image_classifier`` or the archive's handler file); this is what ``guardian protect`` writes.

torch-model-archiver copies ``--handler`` as a file, so these module paths work only in a built
archive's manifest; ``files/`` ships one-class handler files for the archiver, whose paths
``guardian handler-file NAME`` prints.

Settings live in the archive's model-config.yaml under ``handler: guardian:`` (see settings.py).
This package's __init__ stays light: the worker imports it before the handler module.
"""
