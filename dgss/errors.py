"""Errors that the command line reports as one line (no traceback)."""


class ConfigError(ValueError):
    """Bad user input: a config key, value or file. The message names it and says how to fix it."""
