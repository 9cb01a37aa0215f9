"""Typed errors. Library code raises these; the CLI renders them as one line and an exit code.

Every message names the file (or tensor) and what is wrong, so a user can act on it without a
traceback. Tracebacks are shown only with XQUANT_DEBUG=1 (see cli.py).
"""

from __future__ import annotations


class XQuantError(Exception):
    """Base class: a user-facing failure with a one-line message."""

    exit_code = 1


class InputError(XQuantError):
    """An input path is missing, unreadable or not what the command needs."""

    exit_code = 2


class CorruptFileError(InputError):
    """A file exists but its contents are damaged (truncated, bad header, unsafe pickle)."""


class ShapeError(InputError):
    """Tensor shapes or counts disagree with each other or with the config."""


class UnsupportedError(XQuantError):
    """A valid input that xquant does not handle (architecture, dtype, quant type)."""

    exit_code = 3


class OutputError(XQuantError):
    """The output cannot be written where asked (exists, inside an input, disk full)."""

    exit_code = 4


class DiskFullError(OutputError):
    """The filesystem ran out of space while writing."""


class MissingDependencyError(XQuantError):
    """An optional package needed by this command is not installed."""

    exit_code = 5

    def __init__(self, package: str, purpose: str, extra: str | None = None):
        hint = f"pip install 'xquant[{extra}]'" if extra else f"pip install {package}"
        super().__init__(f"{purpose} needs the package '{package}', which is not installed ({hint})")
        self.package = package
