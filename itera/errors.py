"""Typed errors. The library raises these; only the CLI turns them into messages and exit codes.

Every message is one line that names the problem and, where there is one, the fix.
"""


class IteraError(Exception):
    """Base class for errors caused by the user's input. The CLI exits with :attr:`exit_code`."""

    exit_code = 2

    def __init__(self, message: str):
        # Keep messages to one line: the CLI prints exactly one line on stderr.
        super().__init__(" ".join(str(message).split()))


class UsageError(IteraError):
    """Options that are missing, contradictory or out of range."""


class InputError(IteraError):
    """An input (file, directory, record, data source) that is missing or malformed."""


class CheckpointError(InputError):
    """A checkpoint directory that cannot be loaded: missing files, corrupt weights, bad config."""


class UnsupportedModelError(CheckpointError):
    """A model outside the Llama family, or a feature of it that itera does not implement."""


class RecordError(InputError):
    """A record on stdin or in a file that is not valid JSON or not an itera record."""


class DataError(InputError):
    """A data source that cannot be read: missing file, wrong field, unreachable hub dataset."""
