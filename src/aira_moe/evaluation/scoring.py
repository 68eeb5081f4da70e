"""Scoring: the argmax over the next-token logits of the option letters after each prompt, batched."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .tasks import LETTERS


def choice_token_ids(tokenizer) -> list[int]:
    """The token each option letter is encoded as at the start of an answer."""
    ids = [tokenizer.encode(letter, add_special_tokens=False)[-1] for letter in LETTERS]
    if len(set(ids)) != len(LETTERS):
        raise ValueError(f"the tokenizer maps the letters A-D to non-distinct tokens {ids}")
    return ids


def left_pad(prompts: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded ids, attention mask and position ids that restart at 0 on the first real token, so a prompt scores
    the same whatever else is in its batch."""
    length = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, length - len(prompt):] = torch.as_tensor(prompt)
        attention_mask[row, length - len(prompt):] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}


@torch.no_grad()
def predict_letters(
    model: Callable,
    prompts: list[list[int]],
    choice_ids: list[int],
    batch_size: int,
    pad_id: int,
    device,
    on_batch: Optional[Callable[[int], None]] = None,
) -> list[str]:
    """The predicted letter for every prompt."""
    predictions = []
    choice_index = torch.as_tensor(choice_ids, device=device)
    for start in range(0, len(prompts), batch_size):
        batch = {k: v.to(device) for k, v in left_pad(prompts[start:start + batch_size], pad_id).items()}
        logits = model(**batch).logits[:, -1, :]  # (B, vocab): next token after the prompt
        best = logits.index_select(-1, choice_index).float().argmax(-1)  # (B,)
        predictions.extend(LETTERS[i] for i in best.tolist())
        if on_batch is not None:
            on_batch(len(batch["input_ids"]))
    return predictions
