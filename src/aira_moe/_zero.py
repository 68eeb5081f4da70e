"""DeepSpeed ZeRO-3 helpers: partitioned parameters carry ``ds_id``; these gather them only when that is the case."""

from __future__ import annotations

import contextlib
from typing import Iterable, Optional

import torch


def is_partitioned(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


@contextlib.contextmanager
def gathered(params: Iterable[torch.Tensor], modifier_rank: Optional[int] = None):
    """Full parameters inside the block. With ``modifier_rank`` set, that rank's in-place edits are scattered back
    on exit (every rank computes the same edit here, so rank 0 is used)."""
    params = [p for p in params if is_partitioned(p)]
    if params and modifier_rank is None:
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        # a read inside a forward finds its module's weight already fetched; gathering it again would release it on
        # exit, under the module that is still using it
        params = [p for p in params if p.ds_status != ZeroParamStatus.AVAILABLE]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
        yield
