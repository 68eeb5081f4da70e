"""The package's one user-error class. A bad value, a missing or damaged file, a refused action: whatever a user can
fix is raised as a ``UserError`` (or a subclass), and every entry point (the ``aira-moe`` commands, the LLaMA-Factory
seam) prints it as one line and exits with its ``exit_code`` (``report``). It is a ``ValueError`` so that code that
validates values (peft configs, dataclass ``__post_init__``) keeps the exception type its callers expect."""

from __future__ import annotations

import sys


class UserError(ValueError):
    """An error the user can fix; its message is one line that names the offending key, value or file."""

    exit_code = 2


class MissingFileError(UserError, FileNotFoundError):
    """A file or directory the user named (a config, an adapter, a task file) is not there."""


class ExistingOutputError(UserError, FileExistsError):
    """An output the user named already holds files, and replacing them was not asked for."""


def one_line(error: BaseException) -> str:
    """The error's message with every run of whitespace (newlines included) collapsed to one space."""
    return " ".join(str(error).split())


def report(error: UserError, prefix: str) -> int:
    """What an entry point does with a user error: its one line on stderr after ``prefix``; returns its exit code."""
    print(f"{prefix}{one_line(error)}", file=sys.stderr)
    return error.exit_code
