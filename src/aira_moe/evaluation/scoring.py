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
def score_choices(
    model: Callable,
    prompts: list[list[int]],
    choice_ids: list[int],
    batch_size: int,
    pad_id: int,
    device,
    on_batch: Optional[Callable[[int], None]] = None,
) -> tuple[list[str], list[list[float]]]:
    """For every prompt: the predicted letter (argmax over the letters' next-token logits) and the four letters'
    log-probabilities under the full next-token distribution."""
    predictions, logprobs = [], []
    choice_index = torch.as_tensor(choice_ids, device=device)
    for start in range(0, len(prompts), batch_size):
        batch = {k: v.to(device) for k, v in left_pad(prompts[start:start + batch_size], pad_id).items()}
        logits = model(**batch).logits[:, -1, :].float()  # (B, vocab): next token after the prompt
        letters = torch.log_softmax(logits, dim=-1).index_select(-1, choice_index)  # (B, 4)
        predictions.extend(LETTERS[i] for i in letters.argmax(-1).tolist())
        logprobs.extend(letters.tolist())
        if on_batch is not None:
            on_batch(len(batch["input_ids"]))
    return predictions, logprobs


def fit_prompt(encode_with_shots: Callable[[int], list[int]], n_shot: int, limit: int) -> tuple[list[int], bool]:
    """The prompt with as many of its ``n_shot`` examples as fit in ``limit`` tokens (the first ones dropped first),
    cut from the left when even the bare question does not fit (as lm-evaluation-harness does). Returns (ids,
    whether it was shortened)."""
    for kept in range(n_shot, -1, -1):
        ids = encode_with_shots(kept)
        if len(ids) <= limit:
            return ids, kept < n_shot
    return ids[-limit:], True
