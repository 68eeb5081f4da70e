"""The calibration forward pass: hooks on the frozen base Linears, inside context managers that always remove them."""

from __future__ import annotations

import contextlib
from typing import Iterable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm.auto import tqdm

from .._zero import gathered, is_partitioned
from ..calibration.stats import ChannelStats, update_stats
from .quantized import quantized_modules


def distributed_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


def is_main_process() -> bool:
    return not distributed_ready() or dist.get_rank() == 0


def all_reduce_sum(tensors: list[torch.Tensor]) -> None:
    if distributed_ready():
        for tensor in tensors:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


def broadcast_from_main(tensor: torch.Tensor) -> torch.Tensor:
    """Rank 0's value on every rank (in place); identity without torch.distributed."""
    if distributed_ready():
        dist.broadcast(tensor, src=0)
    return tensor


class ActivationRecorder:
    """Accumulates ChannelStats for each named base Linear while ``mask`` holds the current batch's attention mask."""

    def __init__(self, modules: dict[str, nn.Module], need_outputs: bool, device) -> None:
        self.modules = modules
        self.need_outputs = need_outputs
        self.mask: Optional[torch.Tensor] = None
        self.stats = {
            name: ChannelStats.zeros(_in_out(module)[0], _in_out(module)[1] if need_outputs else None, device=device)
            for name, module in modules.items()
        }

    @contextlib.contextmanager
    def hooks(self):
        handles = [module.register_forward_hook(self._hook(name)) for name, module in self.modules.items()]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _hook(self, name: str):
        def record(module, inputs, output):
            if self.mask is None:
                return
            mask = self.mask.to(inputs[0].device)
            outputs = None
            if self.need_outputs:
                outputs = output - module.bias if getattr(module, "bias", None) is not None else output  # W x
            update_stats(self.stats[name], inputs[0].detach(), mask, outputs)

        return record


def _in_out(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    shape = module.weight.ds_shape if hasattr(module.weight, "ds_shape") else module.weight.shape
    return int(shape[0]), int(shape[1])  # Conv1D: (in, out)


@contextlib.contextmanager
def gather_during_forward(model: nn.Module):
    """Under ZeRO-3 (partitioned weights, no DeepSpeed engine yet) gather each module's own parameters just for its
    forward, so memory stays bounded by one module; a no-op otherwise."""
    if not any(is_partitioned(p) for p in model.parameters()):
        yield
        return
    contexts: dict[int, contextlib.ExitStack] = {}

    def enter(module, args):
        stack = contextlib.ExitStack()
        stack.enter_context(gathered(list(module.parameters(recurse=False))))
        contexts[id(module)] = stack

    def leave(module, args, output):
        contexts.pop(id(module)).close()

    handles = []
    for module in model.modules():
        if any(is_partitioned(p) for p in module.parameters(recurse=False)):
            handles.append(module.register_forward_pre_hook(enter))
            handles.append(module.register_forward_hook(leave))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for stack in contexts.values():
            stack.close()


def run_calibration_pass(
    model: nn.Module,
    modules: dict[str, nn.Module],
    loader: Iterable[dict],
    *,
    need_outputs: bool,
    max_batches: Optional[int],
    max_samples: Optional[int] = None,
    desc: str = "aira_moe calibration",
) -> dict[str, ChannelStats]:
    """Forward up to ``max_batches`` batches (or ``max_samples`` sequences) of ``loader`` through ``model`` under
    no_grad and return per-module statistics over real tokens, summed over all ranks."""
    device = next(model.parameters()).device
    recorder = ActivationRecorder(modules, need_outputs, device)
    was_training = model.training
    model.eval()
    # bitsandbytes switches a 4-bit weight to a CPU-only layout (computed by another kernel from then on, in training
    # too) on its first eval-mode no-grad CPU forward; quantised Linears have no dropout, so train mode changes nothing
    for module in quantized_modules(model):
        module.train()
    seen_batches = seen_samples = 0
    progress = tqdm(total=max_batches, desc=desc, disable=not is_main_process(), unit="batch")
    try:
        with torch.no_grad(), recorder.hooks(), gather_during_forward(model):
            for batch in loader:
                if max_batches is not None and seen_batches >= max_batches:
                    break
                if max_samples is not None and seen_samples >= max_samples:
                    break
                input_ids = batch["input_ids"].to(device)
                mask = batch.get("attention_mask")
                mask = torch.ones_like(input_ids) if mask is None else mask.to(device)
                recorder.mask = mask
                model(input_ids=input_ids, attention_mask=mask)
                seen_batches += 1
                seen_samples += input_ids.shape[0]
                progress.update(1)
    finally:
        recorder.mask = None
        progress.close()
        model.train(was_training)
    if seen_batches == 0:
        raise ValueError("calibration loader yielded no batches")
    for stats in recorder.stats.values():
        all_reduce_sum(stats.tensors())
    return recorder.stats
