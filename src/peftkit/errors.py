"""User-facing errors. A user's mistake is a `PeftkitError` (a message, exit code 2); a bug is a traceback."""

from __future__ import annotations


class PeftkitError(Exception):
    """Base class for every error caused by user input. The CLI prints the message and exits 2."""

    exit_code = 2


class ConfigError(PeftkitError):
    """A config file or a `--set` override is invalid."""


class DataError(PeftkitError):
    """A data file, column or row cannot be used."""


class ModelError(PeftkitError):
    """A model name, folder or checkpoint cannot be resolved or loaded."""


class AdapterError(PeftkitError):
    """An adapter folder or file is missing, malformed, or does not fit the base model."""


class ExportError(PeftkitError):
    """An export (GGUF, Ollama) cannot be written: unsupported architecture, tokenizer, adapter or option."""


class Interrupted(PeftkitError):
    """Training stopped by SIGINT / SIGTERM after saving a checkpoint; exits 128 + the signal number."""

    def __init__(self, message: str, signal_number: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signal_number
