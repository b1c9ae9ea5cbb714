"""Handler files for torch-model-archiver's ``--handler``, shipped with the package.

The archiver copies ``--handler`` as a file (anything but a built-in name), so a dotted module path
such as ``guardian_plugin.handlers.GuardedImageClassifier`` fails there with FileNotFoundError; pass
the path of one of these files instead::

    torch-model-archiver ... --handler "$(guardian handler-file image-classifier)"

Each file defines exactly one class, as TorchServe's worker requires, and imports the real handler
from the installed package (the worker needs guardian-plugin installed).

The one copy of the files is the checkout's top-level ``handlers/`` folder. The wheel ships it as
data files (pyproject.toml ``[tool.setuptools.data-files]``: ``share/guardian-plugin/handlers/`` under
the environment's prefix): they are files to copy into an archive, never modules of this package, and
``handlers`` is too generic a name to install as a top-level Python package. :func:`handler_file` finds
them in the checkout first (a source or editable install), else where the installed distribution's
record puts them (any install scheme: venv, --user, --prefix, --target).
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional

FILES: Dict[str, str] = {
    "image-classifier": "guarded_image_classifier.py",  # TorchServe's ImageClassifier behind the guard
    "wrap": "guarded_handler.py",  # any handler of the archive (`handler: guardian: wrap:`) behind the guard
}

DISTRIBUTION = "guardian-plugin"
SHARE = "share/guardian-plugin/handlers"  # the data-files target in pyproject.toml
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
CHECKOUT = os.path.join(ROOT, "handlers")  # a checkout: next to guardian_plugin/ and pyproject.toml


def _installed(filename: str) -> Optional[str]:
    """The file as the installed distribution's RECORD lists it (None: not installed so)."""
    from importlib import metadata

    try:
        dist = metadata.distribution(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return None
    for f in dist.files or []:
        if f.as_posix().endswith(f"{SHARE}/{filename}"):
            path = os.path.abspath(str(dist.locate_file(f)))
            if os.path.isfile(path):
                return path
    return None


def candidates(filename: str) -> List[str]:
    return [os.path.join(CHECKOUT, filename), f"{SHARE}/{filename} of the installed {DISTRIBUTION}"]


def handler_file(name: str) -> str:
    """The absolute path of the handler file called ``name`` (a key of FILES)."""
    from guardian_plugin.errors import ConfigError

    if name not in FILES:
        raise ConfigError(f"no handler file {name!r}; choose one of {sorted(FILES)}")
    filename = FILES[name]
    path = os.path.join(CHECKOUT, filename)
    if os.path.isfile(path) and os.path.isfile(os.path.join(ROOT, "pyproject.toml")):
        return path
    path = _installed(filename)
    if path is None:
        raise ConfigError(f"handler file {filename} not found (looked in {' and '.join(candidates(filename))}): "
                          f"reinstall the package (pip install guardian-plugin, or pip install -e . in a checkout)")
    return path
