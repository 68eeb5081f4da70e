"""Export an aira_moe adapter, exactly, as a standard peft LoRA adapter (what vLLM / SGLang / TGI multi-LoRA load).

Per adapted module, the update against the *original* base weight is a product of two factors:

* the experts folded with the eval pairing (``full``: (sum B)(sum A), rank r; ``heuristic`` / ``random`` with E[M]:
  B_cat (M kron I_r) A_cat, rank num_A * r), with the scale s and the fixed channel weights folded in;
* minus the frozen AwSVD initial update B0 A0 when the base weight was shifted by it (``awsvd_mode='residual'``).

With ``use_dora`` the magnitude per output channel is written as peft's ``lora_magnitude_vector`` with
``use_dora: true``: peft normalises W + BA of the exported pair, which is the same W + dW, so the DoRA adapter is exact
too (peft loads it; servers without DoRA support do not).

The two are concatenated (rank R + R0) and reduced, in fp64, to the product's numerical rank by a QR + SVD of the small
core, which changes nothing beyond fp precision. Standard servers need one rank and one alpha: every module is padded
with zero rows / columns to the largest rank and its scale is already inside B, so ``lora_alpha = r`` (scale 1).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import ExistingOutputError, MissingFileError, UserError
from ..tuner._registry import PEFT_TYPE_NAME
from ..tuner.collaboration import adapter_scaling
from ..tuner.strategies import get_strategy

STATE_PREFIX = "base_model.model."  # peft's saved-key prefix for a PeftModel around a transformers model
AIRA_SUFFIXES = ("aira_moe_A", "aira_moe_B", "aira_moe_channel_scale", "aira_moe_init_A", "aira_moe_init_B",
                 "aira_moe_magnitude")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ModuleAdapter:
    """What one adapted module holds, as saved: experts, pairing, scale, channel weights, AwSVD initial pair."""

    experts_A: torch.Tensor  # (num_A, r, in)
    experts_B: torch.Tensor  # (num_B, out, r)
    strategy: str
    scaling: float
    activation_mode: Optional[str] = None
    channel_scale: Optional[torch.Tensor] = None
    init_A: Optional[torch.Tensor] = None  # (R0, in), subtracted from the base weight as init_B @ init_A
    init_B: Optional[torch.Tensor] = None  # (out, R0)
    magnitude: Optional[torch.Tensor] = None  # (out,) with use_dora


def module_update_factors(module: ModuleAdapter) -> tuple[torch.Tensor, torch.Tensor]:
    """(A: R x in, B: out x R) in fp64 with B @ A = the module's update against the original base weight."""
    experts_A, experts_B = module.experts_A.double(), module.experts_B.double()
    scale = None if module.channel_scale is None else module.channel_scale.double()
    factor_A, factor_B = get_strategy(module.strategy).fold(  # the eval pairing (E[M] for random)
        experts_A,
        experts_B,
        scaling=module.scaling,
        in_scale=scale if module.activation_mode == "inps" else None,
        out_scale=scale if module.activation_mode == "outps" else None,
    )
    if module.init_A is not None:
        factor_A = torch.cat([factor_A, module.init_A.double()], dim=0)  # (R + R0, in)
        factor_B = torch.cat([factor_B, -module.init_B.double()], dim=1)  # (out, R + R0)
    return factor_A, factor_B


def _refuse_token_dependent(config) -> None:
    """Before any work: an adapter whose update depends on the token has no fixed weight to export."""
    get_strategy(config.cola_strategy).refuse_token_dependent("exported as a standard LoRA adapter")


@dataclass
class ReducedFactors:
    A: torch.Tensor  # (k, in)
    B: torch.Tensor  # (out, k)
    rank_needed: int  # numerical rank of B @ A
    relative_error: float  # ||BA - B'A'||_F / ||BA||_F (0 unless truncated)


def reduce_rank(factor_A: torch.Tensor, factor_B: torch.Tensor, max_rank: Optional[int] = None, truncate: bool = False,
                rtol: float = 1e-9, name: str = "module") -> ReducedFactors:
    """Factors of the same product at its numerical rank (singular values above ``rtol`` * the largest), or at
    ``max_rank`` by SVD truncation when ``truncate`` (else a rank above ``max_rank`` is an error naming the module).
    Works on the small core: B = Q_b R_b, A^T = Q_a R_a, B A = Q_b (R_b R_a^T) Q_a^T."""
    q_b, r_b = torch.linalg.qr(factor_B.double())  # (out, k1), (k1, R)
    q_a, r_a = torch.linalg.qr(factor_A.double().T)  # (in, k2), (k2, R)
    u, singular, vh = torch.linalg.svd(r_b @ r_a.T)  # core (k1, k2)
    top = singular[0].item() if singular.numel() else 0.0
    needed = int((singular > rtol * top).sum()) if top > 0 else 0
    keep = needed
    if max_rank is not None and needed > max_rank:
        if not truncate:
            raise UserError(
                f"{name} needs rank {needed} to be exported exactly, above `max_rank`={max_rank}; raise `max_rank` to "
                f"{needed} or pass `truncate` to keep the top {max_rank} singular directions (the error is reported)"
            )
        keep = max_rank
    total = singular.square().sum().sqrt().item()
    error = singular[keep:].square().sum().sqrt().item() / total if total > 0 else 0.0
    root = singular[:keep].sqrt()
    return ReducedFactors(A=root.unsqueeze(1) * (vh[:keep] @ q_a.T), B=(q_b @ u[:, :keep]) * root,
                          rank_needed=needed, relative_error=error)


def _load_state_dict(adapter_dir: str) -> dict[str, torch.Tensor]:
    safetensors_path = os.path.join(adapter_dir, "adapter_model.safetensors")
    if os.path.isfile(safetensors_path):
        from safetensors.torch import load_file

        return load_file(safetensors_path)
    bin_path = os.path.join(adapter_dir, "adapter_model.bin")
    if os.path.isfile(bin_path):
        return torch.load(bin_path, map_location="cpu", weights_only=True)
    raise MissingFileError(f"no adapter weights in {adapter_dir} (adapter_model.safetensors or adapter_model.bin)")


def read_aira_moe_adapter(adapter_dir: str):
    """(config, {module name: ModuleAdapter}, {key: tensor} of the other saved weights, e.g. modules_to_save) from a
    saved aira_moe adapter directory. No base model is needed."""
    from ..tuner.config import AiraMoeConfig

    config_path = os.path.join(adapter_dir, "adapter_config.json")
    if not os.path.isfile(config_path):
        raise MissingFileError(f"no adapter at {adapter_dir}: {config_path} does not exist")
    with open(config_path, encoding="utf-8") as handle:
        peft_type = json.load(handle).get("peft_type")
    if peft_type != PEFT_TYPE_NAME:
        raise UserError(f"{adapter_dir} holds a {peft_type} adapter, not an aira_moe ({PEFT_TYPE_NAME}) one")
    config = AiraMoeConfig.from_pretrained(adapter_dir)
    _refuse_token_dependent(config)
    state = _load_state_dict(adapter_dir)
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    other = {}
    for key, tensor in state.items():
        stem, _, suffix = key.rpartition(".")
        if suffix in AIRA_SUFFIXES:
            grouped.setdefault(stem.removeprefix(STATE_PREFIX), {})[suffix] = tensor
        else:
            other[key] = tensor
    modules = {}
    for name, tensors in grouped.items():
        layer_kwargs = config.layer_kwargs(name)
        rank = tensors["aira_moe_A"].shape[1]
        modules[name] = ModuleAdapter(
            experts_A=tensors["aira_moe_A"],
            experts_B=tensors["aira_moe_B"],
            strategy=layer_kwargs["cola_strategy"],
            scaling=adapter_scaling(layer_kwargs["lora_alpha"], rank, layer_kwargs["use_rslora"], layer_kwargs["scaling_rank"]),
            activation_mode=layer_kwargs["activation_mode"],
            channel_scale=tensors.get("aira_moe_channel_scale"),
            init_A=tensors.get("aira_moe_init_A"),
            init_B=tensors.get("aira_moe_init_B"),
            magnitude=tensors.get("aira_moe_magnitude"),
        )
    if not modules:
        raise UserError(f"{adapter_dir} has no aira_moe weights")
    return config, modules, other


def _refuse_ranks_above(max_rank: Optional[int], truncate: bool, rank_needed: dict[str, int]) -> None:
    """Without truncation, every module must fit ``max_rank``; the error names the one number that makes all fit."""
    if max_rank is None or truncate:
        return
    over = sorted((rank, name) for name, rank in rank_needed.items() if rank > max_rank)
    if over:
        needed, worst = over[-1]
        raise UserError(
            f"{len(over)} of {len(rank_needed)} modules need a rank above `--max_rank` {max_rank} to be exported "
            f"exactly (the largest, {worst}, needs {needed}); pass `--max_rank {needed}` or more, or `--truncate` to "
            f"keep the top {max_rank} singular directions of each (the errors are reported)"
        )


def write_lora_adapter(config, modules: dict[str, ModuleAdapter], other: dict[str, torch.Tensor], out_dir: str, *,
                       max_rank: Optional[int] = None, truncate: bool = False, dtype: Optional[str] = None,
                       overwrite: bool = False) -> dict:
    """Write ``modules`` as a peft LoRA adapter in ``out_dir``; returns a report (rank, per-module ranks and errors)."""
    from safetensors.torch import save_file

    _refuse_token_dependent(config)
    if config.bias != "none":
        raise UserError(f"`bias`={config.bias!r}: trained biases have no place in a standard LoRA adapter; only "
                        "bias='none' adapters can be exported")
    if os.path.exists(out_dir) and os.listdir(out_dir) and not overwrite:
        raise ExistingOutputError(f"{out_dir} exists and is not empty; pass --overwrite (overwrite=True) to replace it")
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"`dtype` must be one of {list(DTYPES)}, got {dtype!r}")
    reduced = {}
    for name, module in modules.items():
        factor_A, factor_B = module_update_factors(module)
        reduced[name] = reduce_rank(factor_A, factor_B, max_rank if truncate else None, truncate, name=name)
    _refuse_ranks_above(max_rank, truncate, {name: r.rank_needed for name, r in reduced.items()})
    rank = max(1, max(r.A.shape[0] for r in reduced.values()))
    out_dtype = DTYPES[dtype] if dtype else next(iter(modules.values())).experts_A.dtype
    tensors = dict(other)
    for name, factors in reduced.items():
        k = factors.A.shape[0]
        padded_A = factors.A.new_zeros(rank, factors.A.shape[1])
        padded_B = factors.B.new_zeros(factors.B.shape[0], rank)
        padded_A[:k], padded_B[:, :k] = factors.A, factors.B
        tensors[f"{STATE_PREFIX}{name}.lora_A.weight"] = padded_A.to(out_dtype).contiguous()
        tensors[f"{STATE_PREFIX}{name}.lora_B.weight"] = padded_B.to(out_dtype).contiguous()
        if modules[name].magnitude is not None:  # peft's saved name of a DoRA magnitude
            tensors[f"{STATE_PREFIX}{name}.lora_magnitude_vector"] = modules[name].magnitude.to(out_dtype).contiguous()
    use_dora = any(module.magnitude is not None for module in modules.values())
    lora_config = {
        "peft_type": "LORA",
        "task_type": config.task_type,
        "base_model_name_or_path": config.base_model_name_or_path,
        "r": rank,
        "lora_alpha": rank,  # every module's scale is folded into its B: scale = lora_alpha / r = 1
        "target_modules": sorted({name.rsplit(".", 1)[-1] for name in modules}),
        "exclude_modules": sorted(config.exclude_modules) if isinstance(config.exclude_modules, (set, list)) else config.exclude_modules,
        "layers_to_transform": config.layers_to_transform,
        "layers_pattern": config.layers_pattern,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": config.fan_in_fan_out,
        "modules_to_save": config.modules_to_save,
        "use_rslora": False,
        "use_dora": use_dora,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "adapter_config.json"), "w", encoding="utf-8") as handle:
        json.dump(lora_config, handle, indent=2)
    report = {
        "out_dir": out_dir,
        "r": rank,
        "modules": len(reduced),
        "rank_needed": {name: r.rank_needed for name, r in reduced.items()},
        "max_relative_error": max(r.relative_error for r in reduced.values()),
        "truncated": {name: r.relative_error for name, r in reduced.items() if r.A.shape[0] < r.rank_needed},
        "dtype": str(out_dtype).removeprefix("torch."),
        "use_dora": use_dora,
    }
    with open(os.path.join(out_dir, "aira_moe_export.json"), "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
    return report


def modules_from_model(tuner, adapter_name: str):
    """{module name: ModuleAdapter} and the modules_to_save weights of a live AiraMoeModel (no save needed)."""
    from peft.utils import ModulesToSaveWrapper

    modules = {}
    for name, layer in tuner.aira_moe_layers(adapter_name).items():
        if layer.merged:
            raise UserError(f"{name} has merged adapters; unmerge them before exporting (the base weight holds them)")
        modules[name] = ModuleAdapter(
            experts_A=layer.aira_moe_A[adapter_name].detach(),
            experts_B=layer.aira_moe_B[adapter_name].detach(),
            strategy=layer.strategy[adapter_name].name,
            scaling=layer.scaling[adapter_name],
            activation_mode=layer.activation_mode.get(adapter_name),
            channel_scale=layer.aira_moe_channel_scale[adapter_name] if adapter_name in layer.aira_moe_channel_scale else None,
            init_A=layer.aira_moe_init_A[adapter_name] if adapter_name in layer.aira_moe_init_A else None,
            init_B=layer.aira_moe_init_B[adapter_name] if adapter_name in layer.aira_moe_init_B else None,
            magnitude=layer.aira_moe_magnitude[adapter_name].detach() if layer._has_magnitude(adapter_name) else None,
        )
    other = {}
    for name, wrapper in tuner.model.named_modules():
        if isinstance(wrapper, ModulesToSaveWrapper) and adapter_name in wrapper.modules_to_save:
            for key, tensor in wrapper.modules_to_save[adapter_name].state_dict().items():
                other[f"{STATE_PREFIX}{name}.{key}"] = tensor.detach()
    return modules, other


def export_lora(adapter_dir: str, out_dir: str, *, max_rank: Optional[int] = None, truncate: bool = False,
                dtype: Optional[str] = None, overwrite: bool = False) -> dict:
    """Convert the saved aira_moe adapter in ``adapter_dir`` into a standard LoRA adapter in ``out_dir``."""
    config, modules, other = read_aira_moe_adapter(adapter_dir)
    return write_lora_adapter(config, modules, other, out_dir, max_rank=max_rank, truncate=truncate, dtype=dtype,
                              overwrite=overwrite)


def to_lora_adapter(model, out_dir: str, adapter_name: Optional[str] = None, *, max_rank: Optional[int] = None,
                    truncate: bool = False, dtype: Optional[str] = None, overwrite: bool = False) -> dict:
    """Write the aira_moe adapter of a live ``PeftModel`` (or ``AiraMoeModel``), exactly, as a standard LoRA adapter
    (no save needed); returns the export report. Lives here, not on the tuner: export reads the tuner, never the
    other way round."""
    from ..tuner.model import AiraMoeModel

    tuner = model if isinstance(model, AiraMoeModel) else getattr(model, "base_model", None)
    if not isinstance(tuner, AiraMoeModel):
        raise UserError(f"to_lora_adapter needs a PeftModel holding an aira_moe adapter, got {type(model).__name__}")
    adapter_name = adapter_name or tuner.active_adapters[0]
    modules, other = modules_from_model(tuner, adapter_name)
    return write_lora_adapter(tuner.peft_config[adapter_name], modules, other, out_dir, max_rank=max_rank,
                              truncate=truncate, dtype=dtype, overwrite=overwrite)
