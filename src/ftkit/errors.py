"""One exception family so entry points can print a single clear line instead of a traceback."""


class FtkitError(ValueError):
    """A user-facing error: the message names the problem and the fix."""


class ConfigError(FtkitError):
    """A recipe or command-line field is unknown or has an invalid value."""


class DataError(FtkitError):
    """The dataset is missing, empty or holds a malformed record."""


class ModelError(FtkitError):
    """The model cannot be loaded or configured as asked."""
