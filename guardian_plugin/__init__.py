"""guardian-plugin: Model-Guardian protection for served image classifiers.

The framework-agnostic core lives in :mod:`guardian_plugin.guardian`; the serving adapters
(:mod:`guardian_plugin.handlers`, :mod:`guardian_plugin.bento`) only call into it.
"""

__version__ = "0.1.0"

from guardian_plugin.errors import ArtifactError, ConfigError, GuardianError  # noqa: E402

__all__ = ["ArtifactError", "ConfigError", "GuardianError", "__version__"]


def __getattr__(name):  # lazy: importing the package must not import torch-heavy modules
    if name in ("Guardian", "Verdict", "InspectResult"):
        from guardian_plugin import guardian

        return getattr(guardian, name)
    raise AttributeError(name)
