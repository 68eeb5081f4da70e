"""Adds ``AIRA_MOE`` to peft's ``PeftType`` enum.

peft 0.18+ only lets ``register_peft_method`` register names that already exist in ``PeftType`` and refuses to save
unknown types, so a third-party method has to add its member first. This is the only place that touches peft internals.
"""

from __future__ import annotations

import peft
from aira_moe_startup import unsupported
from peft.utils.peft_types import PeftType

PEFT_TYPE_NAME = "AIRA_MOE"


def ensure_peft_type() -> PeftType:
    """Return ``PeftType.AIRA_MOE``, adding the member on first call (idempotent)."""
    problem = unsupported("peft", peft.__version__)  # the tested range lives in aira_moe_startup.SUPPORTED
    if problem is not None:
        raise ImportError(f"{problem}.")
    existing = PeftType.__members__.get(PEFT_TYPE_NAME)
    if existing is not None:
        return existing
    # A str-valued enum member built the way EnumType builds them; registered in the three lookup tables that
    # attribute access, value lookup (PeftType("AIRA_MOE")) and iteration (list(PeftType)) use.
    member = str.__new__(PeftType, PEFT_TYPE_NAME)
    member._name_ = PEFT_TYPE_NAME
    member._value_ = PEFT_TYPE_NAME
    member.__objclass__ = PeftType
    type.__setattr__(PeftType, PEFT_TYPE_NAME, member)
    PeftType._member_map_[PEFT_TYPE_NAME] = member
    PeftType._value2member_map_[PEFT_TYPE_NAME] = member
    PeftType._member_names_.append(PEFT_TYPE_NAME)
    return member
