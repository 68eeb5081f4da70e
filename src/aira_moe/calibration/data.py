"""Calibration batches from a tokenised training split (rows with ``input_ids``), sharded by data-parallel rank."""

from __future__ import annotations

from typing import Iterable, Iterator

import torch


def pad_batch(rows: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad ``input_ids`` to the longest row; attention_mask marks the real tokens."""
    length = max(len(row["input_ids"]) for row in rows)
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        ids = torch.as_tensor(row["input_ids"], dtype=torch.long)
        input_ids[i, : len(ids)] = ids
        attention_mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def calibration_batches(
    rows: Iterable[dict], batch_size: int, pad_token_id: int, rank: int = 0, world_size: int = 1
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of ``batch_size`` rows taken from this rank's shard (rows rank, rank + world_size, ...)."""
    if batch_size < 1:
        raise ValueError(f"calibration batch size must be >= 1, got {batch_size}")
    pending = []
    for index, row in enumerate(rows):
        if index % world_size != rank:
            continue
        pending.append(row)
        if len(pending) == batch_size:
            yield pad_batch(pending, pad_token_id)
            pending = []
    if pending:
        yield pad_batch(pending, pad_token_id)
