"""bitsandbytes-quantised base layers (QLoRA): recognising them and reading their weight as floats.

A quantised weight is never written: calibration reads W (LOD needs |W|, AwSVD needs W) by dequantising one module at
a time, so peak memory grows by one module's fp32 weight, and the AwSVD residual stays in the adapter instead of being
subtracted from the base weight (see AiraMoeLayer)."""

from __future__ import annotations

import torch
import torch.nn as nn


def quantization_kind(module: nn.Module) -> str | None:
    """'4bit' (bnb Linear4bit), '8bit' (bnb Linear8bitLt), or None for a float layer."""
    weight = getattr(module, "weight", None)
    if weight is None:
        return None
    if getattr(weight, "quant_state", None) is not None or type(weight).__name__ == "Params4bit":
        return "4bit"
    if type(weight).__name__ == "Int8Params":
        return "8bit"
    return None


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) fp32 weight of a bnb 4-bit or 8-bit Linear, or the float weight itself."""
    kind = quantization_kind(module)
    weight = module.weight
    if kind is None:
        return weight
    import bitsandbytes.functional as bnb_functional

    if kind == "4bit":
        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            # the CPU-only layout bitsandbytes switches to on an eval-mode no-grad forward; calibration never triggers
            # it (collect.run_calibration_pass keeps quantised layers in train mode), so a forward outside aira_moe ran first
            raise RuntimeError(
                f"{type(module).__name__} weight is in bitsandbytes' CPU inference layout (made by a no-grad eval forward "
                "on CPU); load the model again and calibrate before running it in eval mode"
            )
        return bnb_functional.dequantize_4bit(weight.data, weight.quant_state).float()
    # row scales: on the weight until the first forward, which moves them to the layer's matmul state
    scale = getattr(weight, "SCB", None)
    if scale is None:
        scale = getattr(getattr(module, "state", None), "SCB", None)
    if scale is None or weight.data.dtype != torch.int8:
        raise RuntimeError(f"{type(module).__name__} weight is not quantised yet (move the model to its device first)")
    return weight.data.float() * (scale.float().unsqueeze(1) / 127.0)


def quantized_modules(model: nn.Module) -> list[nn.Module]:
    return [module for module in model.modules() if quantization_kind(module) is not None]
