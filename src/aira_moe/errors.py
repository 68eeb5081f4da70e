"""The package's one user-error class. A bad value, a missing or damaged file, a refused action: whatever a user can
fix is raised as a ``UserError`` (or a subclass), and every entry point (the ``aira-moe`` commands, the LLaMA-Factory
seam) prints it as one line and exits with its ``exit_code``. It is a ``ValueError`` so that code that validates values
(peft configs, dataclass ``__post_init__``) keeps the exception type its callers expect."""

from __future__ import annotations


class UserError(ValueError):
    """An error the user can fix; its message is one line that names the offending key, value or file."""

    exit_code = 2


def one_line(error: BaseException) -> str:
    """The error's message with every run of whitespace (newlines included) collapsed to one space."""
    return " ".join(str(error).split())
