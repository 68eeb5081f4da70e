"""A deterministic CPU proxy for step time: the aten ops one training step dispatches.

A tiny Llama is trained as LLaMA-Factory trains it (bf16 base, fp32 trainable adapter weights, bf16 autocast), and
every aten op of one forward + backward is counted by a TorchDispatchMode. Two counts per method:

* kernels: ops that compute something (views and other aliasing ops are metadata only and launch nothing); on a GPU,
  when the adapter's tensors are small, step time follows the number of kernel launches;
* token-sized: kernels that read or write a tensor with one row per token (memory traffic that grows with the batch).

Both must be at most peft LoRA's, for every strategy and technique. ``python tests/test_op_count.py`` prints the table.
"""

from __future__ import annotations

import os
import sys
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, os.path.dirname(__file__))

import aira_moe  # noqa: E402,F401
from aira_moe import AiraMoeConfig  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BATCH, SEQ = 4, 127  # 127 is prime and no weight dimension is a multiple of it: token-sized <=> numel % 127 == 0
RANK = 8


# aliasing or allocation-only ops that launch no kernel (views are recognised by their schema)
METADATA_ONLY = {torch.ops.aten._unsafe_view, torch.ops.aten.detach, torch.ops.aten.alias, torch.ops.aten.empty,
                 torch.ops.aten.empty_strided, torch.ops.aten.new_empty, torch.ops.aten.new_empty_strided}


class KernelCounter(TorchDispatchMode):
    """Counts dispatched aten ops that are not views, and those of them that touch a token-sized tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.kernels: Counter = Counter()
        self.token_sized: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view or func.overloadpacket in METADATA_ONLY:
            return out
        name = str(func.overloadpacket).replace("aten.", "")
        self.kernels[name] += 1
        tensors = [t for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
        if any(t.numel() > 0 and t.numel() % SEQ == 0 for t in tensors):
            self.token_sized[name] += 1
        return out


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=SEQ + 1)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(torch.bfloat16)


def method_configs() -> dict:
    from peft import LoraConfig

    base = dict(r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS)
    pattern = {f"layers.{i}.{t}": (RANK // 2, RANK + RANK // 2)[i] for i in range(2) for t in TARGETS}
    configs = {"lora": LoraConfig(**base)}
    for strategy in ("full", "heuristic", "random"):
        configs[f"aira_{strategy}"] = AiraMoeConfig(**base, num_A=2, num_B=3, cola_strategy=strategy)
        for mode in ("inps", "outps"):
            configs[f"aira_{strategy}_{mode}"] = AiraMoeConfig(
                **base, num_A=2, num_B=3, cola_strategy=strategy, use_activation_aware=True,
                activation_aware_mode=mode, calibrated=True)
        configs[f"aira_{strategy}_all"] = AiraMoeConfig(
            **base, num_A=2, num_B=3, cola_strategy=strategy, rank_pattern=pattern, use_layer_wise_rank=True,
            use_awsvd_init=True, awsvd_mode="residual", use_activation_aware=True, calibrated=True)
    configs["aira_full_1x1"] = AiraMoeConfig(**base, num_A=1, num_B=1, cola_strategy="full")
    return configs


def count_step(config) -> KernelCounter:
    """One forward + backward of a causal-LM loss, as LLaMA-Factory's trainer runs it (``config=None``: the frozen
    model alone, gradients still flowing to the embeddings)."""
    from peft import get_peft_model

    model = tiny_llama()
    model.requires_grad_(False)
    model.enable_input_require_grads()  # as LLaMA-Factory does with gradient checkpointing (its default)
    if config is not None:
        model = get_peft_model(model, config)
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()  # LLaMA-Factory keeps trainable weights in fp32
    model.train()
    ids = torch.randint(0, 128, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids)  # one step outside the count: 'random' starts at step 1 either way
    with KernelCounter() as counter:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    return counter


@pytest.fixture(scope="module")
def counts():
    return {"frozen": count_step(None)} | {name: count_step(config) for name, config in method_configs().items()}


@pytest.mark.parametrize("method", [name for name in method_configs() if name != "lora"])
def test_aira_moe_dispatches_no_more_kernels_than_lora(counts, method):
    lora, aira, frozen = counts["lora"], counts[method], counts["frozen"]
    assert sum(aira.token_sized.values()) <= sum(lora.token_sized.values()), (
        aira.token_sized - lora.token_sized, lora.token_sized - aira.token_sized)
    assert sum(aira.kernels.values()) <= sum(lora.kernels.values()), (
        aira.kernels - lora.kernels, lora.kernels - aira.kernels)
    # the input is never cast: every token-sized copy is the frozen model's own
    assert aira.token_sized["_to_copy"] == frozen.token_sized["_to_copy"]
    # per module: two GEMMs forward, four backward, the add of the update and of its input gradient; nothing else
    # touches a token-sized tensor
    modules = 2 * len(TARGETS)
    assert aira.token_sized - frozen.token_sized == Counter({"mm": 6 * modules, "add": 2 * modules})


def main() -> None:
    frozen = count_step(None)
    print(f"{len(TARGETS) * 2} adapted modules; ops of one forward + backward beyond the frozen model's")
    print("| method | kernels | token-sized | kernels by op |\n|---|---|---|---|")
    for name, config in method_configs().items():
        counter = count_step(config)
        kernels, token_sized = counter.kernels - frozen.kernels, counter.token_sized - frozen.token_sized
        by_op = ", ".join(f"{op} {n}" for op, n in sorted(kernels.items()))
        print(f"| {name} | {sum(kernels.values())} | {sum(token_sized.values())} | {by_op} |")


if __name__ == "__main__":
    main()
