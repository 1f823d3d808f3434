"""User-facing errors: the CLI prints these as one clear message, never a traceback."""

from __future__ import annotations

from typing import Any


class SortedRLError(Exception):
    """A problem with the user's input (config, file, arguments) or environment."""


class ConfigError(SortedRLError):
    """An invalid setting; the message names the field."""


class TrainerFailedError(SortedRLError):
    """The trainer cannot go on (a rank of a distributed trainer died): the run stops at its
    last checkpoint, from which --resume auto goes on."""


class InputFileError(SortedRLError):
    """A bad input file; the message names the file, the line when there is one, and the field."""

    def __init__(self, path: str, message: str, line: int | None = None, field: str | None = None):
        where = f"{path}:{line}" if line is not None else str(path)
        what = f" field '{field}':" if field else ""
        super().__init__(f"{where}:{what} {message}")
        self.path, self.line, self.field = path, line, field


def format_validation_error(e: Any, prefix: str = "") -> str:
    """A pydantic ValidationError as one line naming every bad field: `scheduler.group_size: ...`."""
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err.get("loc", ()))
        loc = f"{prefix}.{loc}" if prefix and loc else (prefix or loc or "settings")
        parts.append(f"{loc}: {err.get('msg')}")
    return "; ".join(parts)
