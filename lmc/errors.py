"""Errors caused by user input. The command line reports them as one line and exits non-zero."""


class ConfigError(ValueError):
    """A bad configuration value; the message names the value and the valid choices."""


class StoreError(RuntimeError):
    """A fault in the run store the user must act on (corrupted checkpoint, unwritable store root); the
    message names the path. The command line reports it as one line and exits 1."""


class CorruptCheckpoint(StoreError):
    """A stored checkpoint is truncated or corrupted (unreadable or its sha256 does not match)."""


class CorruptFile(StoreError):
    """A result file (``results.json``, ``curves.csv``) is truncated or corrupted; the message names it."""


class WriteFailed(StoreError):
    """A file could not be written (no space left, read-only folder); the file it would have replaced is
    intact. The message names the path and the reason."""


class WrongSymmetry(RuntimeError):
    """An alignment changed the function of the model it permuted: the model's symmetry (traced spec or
    declared ``symmetry()``) is wrong for it. The message names the groups involved; the command line
    reports it as one line and exits 1, before any barrier is computed."""
