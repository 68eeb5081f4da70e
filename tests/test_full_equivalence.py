"""CoLA ``full`` num_A x num_B at rank r trains exactly a rank-r LoRA (docs/method.md, "`full` is a LoRA"): with
A(0) = sum_i A_i(0), B(0) = sum_j B_j(0), learning rate num_A*lr on A and num_B*lr on B, weight decay wd/num_A and
wd/num_B, and a global-norm clip that counts A's gradient num_A times and B's num_B times. Pinned in fp64."""

import math

import pytest
import torch
from conftest import make_tiny_llama, train_side_by_side
from peft import LoraConfig, get_peft_model

from aira_moe import AiraMoeConfig
from aira_moe.tuner.strategies import get_strategy
from aira_moe.tuner.layer import AiraMoeLayer

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NUM_A, NUM_B, RANK, LR, STEPS = 2, 3, 4, 1e-2, 6


def factor_pairs(model, kind: str) -> dict[str, tuple[torch.nn.Parameter, torch.nn.Parameter]]:
    """module name -> (A, B) trainable parameters of the default adapter."""
    pairs = {}
    for name, module in model.named_modules():
        if kind == "aira" and isinstance(module, AiraMoeLayer):
            pairs[name] = (module.aira_moe_A["default"], module.aira_moe_B["default"])
        elif kind == "lora" and hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            pairs[name] = (module.lora_A["default"].weight, module.lora_B["default"].weight)
    return pairs


def build_pair():
    """CoLA 2x3 `full` (random non-zero B so that B's mapping is exercised) and the LoRA that starts at its sums."""
    aira = get_peft_model(make_tiny_llama(seed=0), AiraMoeConfig(
        r=RANK, lora_alpha=2 * RANK, num_A=NUM_A, num_B=NUM_B, cola_strategy="full", target_modules=TARGETS,
        init_weights=False)).double()
    lora = get_peft_model(make_tiny_llama(seed=0), LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS)).double()
    aira_pairs, lora_pairs = factor_pairs(aira, "aira"), factor_pairs(lora, "lora")
    assert aira_pairs.keys() == lora_pairs.keys() and len(aira_pairs) == 14
    with torch.no_grad():
        for name, (experts_A, experts_B) in aira_pairs.items():
            lora_pairs[name][0].copy_(experts_A.sum(0))  # (r, in)
            lora_pairs[name][1].copy_(experts_B.sum(0))  # (out, r)
    return aira, lora, aira_pairs, lora_pairs


def clip_counted(groups: list[tuple[list[torch.Tensor], int]], max_norm: float) -> float:
    """torch's clip_grad_norm_ rule with each group's squared norm counted ``copies`` times; returns that norm."""
    total = math.sqrt(sum(copies * sum(p.grad.pow(2).sum().item() for p in params) for params, copies in groups))
    coefficient = min(1.0, max_norm / (total + 1e-6))
    for params, _ in groups:
        for p in params:
            p.grad.mul_(coefficient)
    return total


def train_both(weight_decay: float, max_norm: float | None, corrected: bool):
    aira, lora, aira_pairs, lora_pairs = build_pair()
    aira_params = [p for pair in aira_pairs.values() for p in pair]
    start = [pair[0].detach().clone() for pair in lora_pairs.values()]
    lora_A = [pair[0] for pair in lora_pairs.values()]
    lora_B = [pair[1] for pair in lora_pairs.values()]
    wd_A, wd_B = (weight_decay / NUM_A, weight_decay / NUM_B) if corrected else (weight_decay, weight_decay)
    aira_opt = torch.optim.AdamW(aira_params, lr=LR, weight_decay=weight_decay)
    lora_opt = torch.optim.AdamW([{"params": lora_A, "lr": NUM_A * LR, "weight_decay": wd_A},
                                  {"params": lora_B, "lr": NUM_B * LR, "weight_decay": wd_B}])
    clipped = []

    def clip():
        norm = torch.nn.utils.clip_grad_norm_(aira_params, max_norm).item()
        clipped.append(norm > max_norm)
        clip_counted([(lora_A, NUM_A if corrected else 1), (lora_B, NUM_B if corrected else 1)], max_norm)

    logit_gap = train_side_by_side([aira, lora], [aira_opt, lora_opt], STEPS, clip if max_norm is not None else None)
    with torch.no_grad():
        factor_gap = max(max((experts_A.sum(0) - lora_pairs[name][0]).abs().max().item(),
                             (experts_B.sum(0) - lora_pairs[name][1]).abs().max().item())
                         for name, (experts_A, experts_B) in aira_pairs.items())
        moved = max((pair[0] - first).abs().max().item() for pair, first in zip(lora_pairs.values(), start))
    return logit_gap, factor_gap, clipped, moved


@pytest.mark.parametrize("weight_decay, max_norm", [(0.0, None), (0.1, None), (0.0, 0.05), (0.1, 0.05)],
                         ids=["plain", "weight_decay", "clipping", "both"])
def test_full_trains_exactly_the_mapped_lora(weight_decay, max_norm):
    logit_gap, factor_gap, clipped, moved = train_both(weight_decay, max_norm, corrected=True)
    assert moved > 1e-3, "training must move the factors for the match to mean anything"
    if max_norm is not None:
        assert all(clipped), "the clip must be active on every step for the correction to be tested"
    assert logit_gap <= 1e-10 and factor_gap <= 1e-10, (logit_gap, factor_gap)


@pytest.mark.parametrize("weight_decay, max_norm", [(0.1, None), (0.0, 0.05)], ids=["weight_decay", "clipping"])
def test_without_the_correction_the_two_part(weight_decay, max_norm):
    """The corrections are needed: the same LoRA with plain wd / a plain clip drifts away measurably."""
    _, factor_gap, _, _ = train_both(weight_decay, max_norm, corrected=False)
    assert factor_gap > 1e-6, factor_gap


def test_note_names_the_equivalent_lora():
    assert get_strategy("full").config_note(num_A=1, num_B=1, r=8) is None
    assert get_strategy("heuristic").config_note(num_A=1, num_B=1, r=8) is None
    assert get_strategy("routed").config_note(num_A=2, num_B=3, r=8) is None
    note = get_strategy("full").config_note(num_A=2, num_B=3, r=8)
    assert "\n" not in note
    for part in ("rank-8 LoRA", "2x", "3x", "between 2x and 3x", "heuristic", "num_A: 1, num_B: 1"):
        assert part in note, part


@pytest.mark.parametrize("num_A, num_B, r, expected", [
    (2, 3, 8, ["rank-16 LoRA (2 blocks of rank 8", "B learn at 2x, 1x the learning rate", "1 of the 3 B experts is a copy",
               "`num_A: 1, num_B: 1` spends the same parameters"]),
    (1, 3, 4, ["rank-4 LoRA (1 block of rank 4", "B learn at 3x the learning rate", "2 of the 3 B experts are copies"]),
    (2, 2, 8, ["rank-16 LoRA (2 blocks of rank 8", "with one learning rate, no copies (docs/method.md)."]),
    (3, 2, 8, ["rank-16 LoRA (2 blocks of rank 8", "1 of the 3 A experts drives no B and never learns",
               "`num_A: 1, num_B: 1` spends"]),
])
def test_heuristic_note_names_the_lora_blocks_and_their_rates(num_A, num_B, r, expected):
    """The note of tests/test_heuristic_equivalence.py's theorem, for any shape (copies, idle A experts or neither)."""
    note = get_strategy("heuristic").config_note(num_A=num_A, num_B=num_B, r=r)
    assert "\n" not in note and note.startswith(f"cola_strategy 'heuristic' with num_A={num_A}, num_B={num_B} trains ")
    for part in expected:
        assert part in note, (part, note)
    assert ("spends the same parameters" in note) == (num_A != num_B)


@pytest.mark.parametrize("strategy, expected", [("full", 1), ("heuristic", 1), ("routed", 0)])
def test_check_logs_the_equivalence_once(strategy, expected, tmp_path):
    """`aira-moe check` (and so `llamafactory-cli train`, through the same parser) logs the strategy's note once."""
    pytest.importorskip("llamafactory")
    import logging
    import os

    import yaml

    from aira_moe.integrations.llamafactory import check_train_config

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(repo, "configs", "math.yaml"), encoding="utf-8") as handle:
        args = yaml.safe_load(handle)
    args.update(bf16=False, output_dir=str(tmp_path / "out"), dataset_dir=os.path.join(repo, "data"),
                cola_strategy=strategy)

    class Collect(logging.Handler):
        def __init__(self):
            super().__init__()
            self.lines = []

        def emit(self, record):
            self.lines.append(record.getMessage())

    collect = Collect()
    logging.getLogger("aira_moe").addHandler(collect)
    try:
        check_train_config(args)
    finally:
        logging.getLogger("aira_moe").removeHandler(collect)
    notes = [line for line in collect.lines if "trains exactly a rank-" in line]
    assert len(notes) == expected, collect.lines
    if expected:
        assert notes == [get_strategy(strategy).config_note(args["num_A"], args["num_B"], args["lora_rank"])]
