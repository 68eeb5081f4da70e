"""A deterministic CPU proxy for step time: the aten ops one training step dispatches.

A tiny Llama is trained as LLaMA-Factory trains it (bf16 base, fp32 trainable adapter weights, bf16 autocast), and
every aten op of one forward + backward is counted by a TorchDispatchMode. Two counts per method:

* kernels: ops that compute something (views and other aliasing ops are metadata only and launch nothing); on a GPU,
  when the adapter's tensors are small, step time follows the number of kernel launches;
* token-sized: kernels that read or write a tensor with one row per token (memory traffic that grows with the batch).

Both must be at most peft LoRA's, for every strategy and technique. ``python tests/test_op_count.py`` prints the table.

A second check covers a whole optimizer step as ``llamafactory-cli train`` runs it (LLaMA-Factory's ``run_exp``: bf16
autocast, gradient checkpointing, clipping, AdamW): the host-side work of that step -- aten dispatches (views too),
kernels, host-device synchronisations and Python calls -- must be at most LoRA's for aira_moe with every technique.
On a GPU where the step is bound by launch overhead (the 1B case of benchmarks/train_e2e.py) that is what sets
its time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from contextlib import contextmanager

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


def launches_kernel(func) -> bool:
    return not (func.is_view or func.overloadpacket in METADATA_ONLY)


class KernelCounter(TorchDispatchMode):
    """Counts dispatched aten ops that are not views, and those of them that touch a token-sized tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.kernels: Counter = Counter()
        self.token_sized: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not launches_kernel(func):
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


def module_path(layer: int, target: str) -> str:
    return f"layers.{layer}.{'mlp' if target.endswith('_proj') and target[0] in 'gud' else 'self_attn'}.{target}"


def method_configs() -> dict:
    from peft import LoraConfig

    base = dict(r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS)
    pattern = {module_path(i, t): (RANK // 2, RANK + RANK // 2)[i] for i in range(2) for t in TARGETS}
    odd_pattern = {module_path(i, t): (RANK // 2 - 1, RANK + RANK // 2 + 1)[i] for i in range(2) for t in TARGETS}
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
        # allocated ranks that CUDA pads to a multiple of 8 (padding forced on CPU here, see PADDED)
        configs[f"aira_{strategy}_all_padded"] = AiraMoeConfig(
            **base, num_A=2, num_B=3, cola_strategy=strategy, rank_pattern=odd_pattern, use_layer_wise_rank=True,
            use_awsvd_init=True, awsvd_mode="residual", use_activation_aware=True, calibrated=True)
    configs["aira_full_1x1"] = AiraMoeConfig(**base, num_A=1, num_B=1, cola_strategy="full")
    return configs


PADDED = 8  # the inner dimension of the '_padded' methods is padded to a multiple of this, as CUDA does


@contextmanager
def rank_multiple_on_cpu(multiple: int):
    """Pad the adapters' inner dimension on CPU as they are on CUDA."""
    from aira_moe.tuner import layer

    layer.RANK_MULTIPLE["cpu"] = multiple
    try:
        yield
    finally:
        del layer.RANK_MULTIPLE["cpu"]


def count_step(config, rank_multiple: int = 1) -> KernelCounter:
    """One forward + backward of a causal-LM loss, as LLaMA-Factory's trainer runs it (``config=None``: the frozen
    model alone, gradients still flowing to the embeddings)."""
    with rank_multiple_on_cpu(rank_multiple):
        return _count_step(config)


def _count_step(config) -> KernelCounter:
    from peft import get_peft_model

    model = tiny_llama()
    model.requires_grad_(False)
    model.enable_input_require_grads()  # as LLaMA-Factory does with gradient checkpointing (its default)
    if config is not None:
        model = get_peft_model(model, config)
        for layer_index, target in zip((0, 1), TARGETS):  # a rank pattern must have matched (else r is used silently)
            module = model.get_submodule(f"base_model.model.model.{module_path(layer_index, target)}")
            assert module.r["default"] == config.rank_pattern.get(module_path(layer_index, target), config.r)
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
    return {"frozen": count_step(None)} | {name: count_step(config, multiple(name)) for name, config in method_configs().items()}


def multiple(method: str) -> int:
    return PADDED if method.endswith("_padded") else 1


# heuristic/random with every technique and padding are above LoRA (the padding's two cats, below): not held here
@pytest.mark.parametrize("method", [name for name in method_configs()
                                    if name != "lora" and not (name.endswith("_padded") and "_full_" not in name)])
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


@pytest.mark.parametrize("strategy", ["full", "heuristic", "random"])
def test_rank_padding_costs_one_cat_per_factor_and_nothing_in_backward(counts, strategy):
    """CUDA pads an allocated rank such as 13 to 16: one cat of a cached zero block per factor, whose backward is a
    view (F.pad was a fill and a copy forward and a copy backward per factor, ~6 kernels a module)."""
    padded, unpadded = counts[f"aira_{strategy}_all_padded"], counts[f"aira_{strategy}_all"]
    modules = 2 * len(TARGETS)
    assert padded.kernels - unpadded.kernels == Counter({"cat": 2 * modules})
    assert unpadded.kernels - padded.kernels == Counter()
    assert padded.token_sized == unpadded.token_sized


# one whole training step through LLaMA-Factory; every aira_moe variant uses the full strategy (the recipes')
LLAMAFACTORY_METHODS = {
    "lora": {"finetuning_type": "lora"},
    "aira_basic": {"finetuning_type": "aira_moe", "num_A": 2, "num_B": 3},
    "aira_all_inps": {"finetuning_type": "aira_moe", "num_A": 2, "num_B": 3, "use_layer_wise_rank": True,
                      "rank_budget": "auto", "min_rank": 2, "max_rank": 8, "use_awsvd_init": True,
                      "use_activation_aware": True, "activation_aware_mode": "inps", "awsvd_collect_steps": 2},
}
LLAMAFACTORY_METHODS["aira_all_outps"] = {**LLAMAFACTORY_METHODS["aira_all_inps"], "activation_aware_mode": "outps"}
# the table in benchmarks/README.md adds these (``--all``); '_padded' pads the inner dimension as CUDA does
TABLE_METHODS = {**LLAMAFACTORY_METHODS,
                 "aira_all_inps_padded": LLAMAFACTORY_METHODS["aira_all_inps"],
                 "aira_heuristic": {**LLAMAFACTORY_METHODS["aira_basic"], "cola_strategy": "heuristic"},
                 "aira_random": {**LLAMAFACTORY_METHODS["aira_basic"], "cola_strategy": "random"}}
HOST_SYNCS = {"_local_scalar_dense", "item", "nonzero", "is_nonzero", "equal"}  # ops that wait for the device


class HostWork(TorchDispatchMode):
    """Every aten dispatch (views included), the kernels among them and the host-device syncs while active."""

    def __init__(self, counts: Counter) -> None:
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket).replace("aten.", "")
        self.counts["dispatches"] += 1
        self.counts["kernels"] += launches_kernel(func)
        self.counts["syncs"] += name in HOST_SYNCS
        return func(*args, **(kwargs or {}))


def llamafactory_step_counts(workdir: str, num_layers: int = 2, methods: dict = LLAMAFACTORY_METHODS) -> dict:
    """In this process: LLaMA-Factory's run_exp for each method on the tiny assets, counting its third and fourth
    steps (the first ones are warm-up)."""
    from transformers import LlamaForCausalLM, TrainerCallback
    from llamafactory.train.tuner import run_exp

    from aira_moe.tiny import build_tiny_assets

    assets = build_tiny_assets(os.path.join(workdir, "assets"), num_layers=num_layers)
    # a bf16 checkpoint, as real Llama weights are (LLaMA-Factory then keeps the frozen base in bf16)
    LlamaForCausalLM.from_pretrained(assets["model"]).to(torch.bfloat16).save_pretrained(assets["model"])

    class CountSteps(TrainerCallback):
        """Aten dispatches of the third step; Python calls of the fourth, with no dispatch mode adding its own."""

        def __init__(self) -> None:
            self.counts = Counter()
            self.mode = HostWork(self.counts)

        def count_python_call(self, frame, event, arg) -> None:
            self.counts["python_calls"] += event == "call"

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 2:
                self.mode.__enter__()
            elif state.global_step == 3:
                sys.setprofile(self.count_python_call)

        def on_step_end(self, args, state, control, **kwargs):
            # global_step is incremented after the optimizer step, before this call
            if state.global_step == 3:
                self.mode.__exit__(None, None, None)
            elif state.global_step == 4:
                sys.setprofile(None)

    counts = {}
    for name, method in methods.items():
        counter = CountSteps()
        args = {"model_name_or_path": assets["model"], "stage": "sft", "do_train": True, "dataset": assets["dataset"],
                "dataset_dir": assets["dataset_dir"], "template": "default", "cutoff_len": 64, "overwrite_cache": True,
                "output_dir": os.path.join(workdir, name), "overwrite_output_dir": True,
                "per_device_train_batch_size": 4, "max_steps": 5, "save_strategy": "no", "report_to": "none",
                "lora_rank": 4, "lora_alpha": 8, "lora_target": "all", "bf16": True, "use_cpu": True,
                "dataloader_num_workers": 0, "preprocessing_num_workers": 1, **method}
        with rank_multiple_on_cpu(multiple(name)):
            run_exp(args, callbacks=[counter])
        counts[name] = dict(counter.counts)
    return counts


@pytest.fixture(scope="module")
def llamafactory_counts(tmp_path_factory):
    pytest.importorskip("llamafactory")
    workdir = tmp_path_factory.mktemp("lf_step")
    out = workdir / "counts.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "DISABLE_VERSION_CHECK": "1"}
    result = subprocess.run([sys.executable, __file__, "--llamafactory", str(workdir), str(out)], capture_output=True,
                            text=True, env=env, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("method", [name for name in LLAMAFACTORY_METHODS if name != "lora"])
def test_llamafactory_step_host_work_at_most_lora(llamafactory_counts, method):
    lora, aira = llamafactory_counts["lora"], llamafactory_counts[method]
    assert lora["dispatches"] > 1000 and lora["python_calls"] > 1000  # the counters saw a whole step
    for kind in ("dispatches", "kernels", "syncs", "python_calls"):
        assert aira.get(kind, 0) <= lora.get(kind, 0), (kind, aira, lora)


def main() -> None:
    frozen = count_step(None)
    print(f"{len(TARGETS) * 2} adapted modules; ops of one forward + backward beyond the frozen model's")
    print("| method | kernels | token-sized | kernels by op |\n|---|---|---|---|")
    for name, config in method_configs().items():
        counter = count_step(config, multiple(name))
        kernels, token_sized = counter.kernels - frozen.kernels, counter.token_sized - frozen.token_sized
        by_op = ", ".join(f"{op} {n}" for op, n in sorted(kernels.items()))
        print(f"| {name} | {sum(kernels.values())} | {sum(token_sized.values())} | {by_op} |")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--llamafactory"]:  # WORKDIR OUT [NUM_LAYERS [--all]]: the slow test; --all: README's table
        counts = llamafactory_step_counts(sys.argv[2], *map(int, sys.argv[4:5]),
                                          **({"methods": TABLE_METHODS} if "--all" in sys.argv else {}))
        json.dump(counts, open(sys.argv[3], "w", encoding="utf-8"))
    else:
        main()
