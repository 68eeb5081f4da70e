"""Shared fixtures: tiny models built in code (no downloads)."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import aira_moe  # noqa: E402,F401  (registers the method with peft)


def tiny_llama_config(num_layers: int = 2, hidden: int = 64, vocab: int = 128):
    from aira_moe.tiny import tiny_llama_config as config

    return config(vocab, hidden, num_layers, max_positions=128)


def make_tiny_llama(num_layers: int = 2, seed: int = 0, dtype=torch.float32):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(num_layers)).to(dtype).eval()


def random_batches(num_batches: int, batch: int = 4, length: int = 12, vocab: int = 128, seed: int = 0, pad_tail: int = 0):
    """Batches of random ids; the last ``pad_tail`` positions of every odd row are padding."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(num_batches):
        ids = torch.randint(1, vocab, (batch, length), generator=gen)
        mask = torch.ones(batch, length, dtype=torch.long)
        if pad_tail:
            mask[1::2, -pad_tail:] = 0
            ids[1::2, -pad_tail:] = 0
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture
def input_ids():
    return torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))
