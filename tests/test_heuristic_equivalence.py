"""CoLA ``heuristic`` num_A x num_B at rank r trains exactly num_A LoRA blocks of rank r (one rank-num_A*r LoRA) whose
block i has the B rate x k_i, k_i = the number of B experts bound to A_i (docs/method.md, "`heuristic` is a LoRA
too"): B experts bound to the same A get the same gradient, so under AdamW they move by the same step and, from equal
starts, stay equal -- with 2x3, B_3 is a copy of B_1. Weight decay needs wd / k_i on block i's B. Pinned in fp64."""

import pytest
import torch
from conftest import make_tiny_llama, train_side_by_side
from peft import LoraConfig, get_peft_model

from aira_moe import AiraMoeConfig
from aira_moe.tuner.collaboration import heuristic_pairing
from aira_moe.tuner.layer import AiraMoeLayer

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NUM_A, NUM_B, RANK, LR, STEPS = 2, 3, 4, 1e-2, 6


def build_pair():
    """2x3 heuristic (random B, the copies made equal) and two LoRA blocks started at (A_i, sum of A_i's B experts)."""
    aira = get_peft_model(make_tiny_llama(seed=0), AiraMoeConfig(
        r=RANK, lora_alpha=2 * RANK, num_A=NUM_A, num_B=NUM_B, cola_strategy="heuristic", target_modules=TARGETS,
        init_weights=False)).double()
    pairing = heuristic_pairing(NUM_A, NUM_B)  # (num_B, num_A), one 1 per row
    bound = [pairing[:, i].nonzero().flatten().tolist() for i in range(NUM_A)]  # B experts of each A
    assert bound == [[0, 2], [1]]
    lora = get_peft_model(make_tiny_llama(seed=0), LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS),
                          adapter_name="block0")
    lora.add_adapter("block1", LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS))
    lora.base_model.set_adapter(["block0", "block1"])  # both blocks active and trainable: their updates add up
    lora = lora.double()
    experts = {name: module for name, module in aira.named_modules() if isinstance(module, AiraMoeLayer)}
    blocks = {name: module for name, module in lora.named_modules() if hasattr(module, "lora_A") and "block0" in module.lora_A}
    assert experts.keys() == blocks.keys() and len(experts) == 14
    with torch.no_grad():
        for name, layer in experts.items():
            experts_A, experts_B = layer.aira_moe_A["default"], layer.aira_moe_B["default"]
            experts_B[2].copy_(experts_B[0])  # equal starts for the copies (the default init has every B at zero)
            for i, adapter in enumerate(("block0", "block1")):
                blocks[name].lora_A[adapter].weight.copy_(experts_A[i])
                blocks[name].lora_B[adapter].weight.copy_(experts_B[bound[i]].sum(0))
    return aira, lora, experts, blocks, bound


def train_both(weight_decay: float):
    aira, lora, experts, blocks, bound = build_pair()
    start = {name: layer.aira_moe_B["default"].detach().clone() for name, layer in experts.items()}
    aira_params = [p for layer in experts.values() for p in (layer.aira_moe_A["default"], layer.aira_moe_B["default"])]
    groups = []
    for i, adapter in enumerate(("block0", "block1")):
        copies = len(bound[i])
        groups.append({"params": [b.lora_A[adapter].weight for b in blocks.values()], "lr": LR, "weight_decay": weight_decay})
        groups.append({"params": [b.lora_B[adapter].weight for b in blocks.values()], "lr": copies * LR,
                       "weight_decay": weight_decay / copies})
    aira_opt = torch.optim.AdamW(aira_params, lr=LR, weight_decay=weight_decay)
    lora_opt = torch.optim.AdamW(groups)
    logit_gap = train_side_by_side([aira, lora], [aira_opt, lora_opt], STEPS)
    moved = max((layer.aira_moe_B["default"] - start[name]).abs().max().item() for name, layer in experts.items())
    return experts, blocks, bound, logit_gap, moved


@pytest.mark.parametrize("weight_decay", [0.0, 0.1], ids=["plain", "weight_decay"])
def test_heuristic_trains_exactly_lora_blocks_with_per_block_b_rates(weight_decay):
    experts, blocks, bound, logit_gap, moved = train_both(weight_decay)
    assert moved > 1e-3, "training must move the factors for the match to mean anything"
    assert logit_gap <= 1e-10, logit_gap
    for name, layer in experts.items():
        experts_A, experts_B = layer.aira_moe_A["default"], layer.aira_moe_B["default"]
        assert torch.equal(experts_B[0], experts_B[2]), name  # the copy stays a copy, bit for bit
        for i, adapter in enumerate(("block0", "block1")):
            assert (experts_A[i] - blocks[name].lora_A[adapter].weight).abs().max() <= 1e-10
            assert (experts_B[bound[i]].sum(0) - blocks[name].lora_B[adapter].weight).abs().max() <= 1e-10
