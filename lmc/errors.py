"""Errors caused by user input. The command line reports them as one line and exits non-zero."""


class ConfigError(ValueError):
    """A bad configuration value; the message names the value and the valid choices."""
