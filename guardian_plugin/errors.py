"""Exceptions that name what went wrong and where."""


class GuardianError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(GuardianError):
    """A configuration file or value is invalid; the message names the file and the field."""


class ArtifactError(GuardianError):
    """A detector artifact is missing, corrupt or of an unknown format; the message names the file."""


class LedgerUnavailable(GuardianError):
    """The per-client store cannot be reached."""


class ModelMismatch(ConfigError):
    """A detector artifact was trained for other inputs or another class count than the model it guards."""


class MissingDependency(GuardianError, ImportError):
    """An optional package that a configured component needs is not installed; the message names it."""
