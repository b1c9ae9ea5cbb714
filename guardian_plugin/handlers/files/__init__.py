"""Handler files for torch-model-archiver's ``--handler``, shipped with the package.

The archiver copies ``--handler`` as a file (anything but a built-in name), so a dotted module path
such as ``guardian_plugin.handlers.GuardedImageClassifier`` fails there with FileNotFoundError; pass
the path of one of these files instead::

    torch-model-archiver ... --handler "$(guardian handler-file image-classifier)"

Each file defines exactly one class, as TorchServe's worker requires, and imports the real handler
from the installed package (the worker needs guardian-plugin installed).
"""

from __future__ import annotations

import os
from typing import Dict

FILES: Dict[str, str] = {
    "image-classifier": "guarded_image_classifier.py",  # TorchServe's ImageClassifier behind the guard
    "wrap": "guarded_handler.py",  # any handler of the archive (`handler: guardian: wrap:`) behind the guard
}


def handler_file(name: str) -> str:
    """The absolute path of the handler file called ``name`` (a key of FILES)."""
    if name not in FILES:
        from guardian_plugin.errors import ConfigError

        raise ConfigError(f"no handler file {name!r}; choose one of {sorted(FILES)}")
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), FILES[name])
