"""Calibration batches from a tokenised training split, sharded by data-parallel rank. Rows hold ``input_ids`` (sft,
pt, kto) or, for pairwise data (dpo, rm), ``chosen_input_ids``: the prompt with its preferred answer."""

from __future__ import annotations

from typing import Iterable, Iterator

import torch


SEQUENCE_KEYS = ("input_ids", "chosen_input_ids")


def sequence_key(row: dict) -> str:
    """The column holding the token ids to calibrate on (the first of SEQUENCE_KEYS the row has)."""
    for key in SEQUENCE_KEYS:
        if key in row:
            return key
    raise ValueError(f"calibration rows need one of {list(SEQUENCE_KEYS)}; this dataset's rows have {sorted(row)}")


def pad_batch(rows: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad each row's token ids to the longest row; attention_mask marks the real tokens."""
    key = sequence_key(rows[0])
    length = max(len(row[key]) for row in rows)
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        ids = torch.as_tensor(row[key], dtype=torch.long)
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
