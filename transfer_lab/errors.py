"""The one error type for bad input (kept import-light: the command line checks use it before
torch and Lightning are imported)."""


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key and the value."""
