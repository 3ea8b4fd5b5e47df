"""Errors caused by user input. The command line reports them as one line and exits non-zero."""


class ConfigError(ValueError):
    """A bad configuration value; the message names the value and the valid choices."""


class StoreError(RuntimeError):
    """A fault in the run store the user must act on (corrupted checkpoint, unwritable store root); the
    message names the path. The command line reports it as one line and exits 1."""


class CorruptCheckpoint(StoreError):
    """A stored checkpoint is truncated or corrupted (unreadable or its sha256 does not match)."""
