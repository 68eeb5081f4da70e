"""Patching LLaMA-Factory by name, as both seams do (llamafactory.py, llamaboard.py): each function is wrapped once and
marked; whatever a version lacks is named with the supported range."""

from __future__ import annotations

import sys

from aira_moe_startup import SUPPORTED

PATCHED_MARK = "__aira_moe_patched__"


def missing(what: str) -> RuntimeError:
    """The error for the imported LLaMA-Factory when it lacks ``what``, a name the seams patch."""
    low, high = SUPPORTED["llamafactory"]
    return RuntimeError(
        f"aira_moe cannot install into LLaMA-Factory {sys.modules['llamafactory'].__version__}: {what} is missing. "
        f"aira_moe supports llamafactory >= {low}, < {high}; install that version."
    )


def replace(module, name: str, make_wrapper) -> None:
    """``module.name`` = ``make_wrapper(original)``, once (idempotent); ``missing`` when there is no such name."""
    original = getattr(module, name, None)
    if original is None:
        raise missing(f"{module.__name__}.{name}")
    if getattr(original, PATCHED_MARK, False):
        return
    wrapper = make_wrapper(original)
    setattr(wrapper, PATCHED_MARK, True)
    setattr(module, name, wrapper)
