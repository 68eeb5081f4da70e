"""Calibration of an AiraMoe model: one pass, then allocation, weighting and AwSVD, identical on every rank.

The model-aware orchestration lives beside the tuner (as peft keeps lora/eva.py beside LoraModel); the math it
uses is in ``aira_moe.calibration``, which imports nothing else from the package."""

from __future__ import annotations

import re
import time
import zlib
from typing import Iterable, Optional

import torch
from tqdm.auto import tqdm

from .._logging import get_logger
from .._zero import gathered
from ..errors import UserError
from ..calibration.allocation import allocate_ranks, resolve_budget
from ..calibration.awsvd import awsvd_directions, awsvd_factors, divide_out_input_weights
from ..calibration.report import build_report, format_table, write_report
from ..calibration.stats import (
    ChannelStats,
    activation_importance,
    channel_scores,
    input_channel_norms,
    input_rms,
    lod_score,
)
from .collect import broadcast_from_main, is_main_process, run_calibration_pass
from .quantized import dequantized_weight
from .strategies.routed import router_parameters

logger = get_logger()


def allocation_units(module_names: Iterable[str], layers_pattern=None) -> dict[str, list[str]]:
    """Group module names by decoder layer: the unit is the name prefix up to the first ``.<index>.`` (after
    ``layers_pattern`` when given); a module outside any indexed layer is a unit of its own. Ordered by index."""
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern or [])
    regex = re.compile(rf"^(.*?\.(?:{'|'.join(map(re.escape, patterns))})\.(\d+))\." if patterns else r"^(.*?\.(\d+))\.")
    units: dict[str, list[str]] = {}
    order: dict[str, tuple] = {}
    for name in module_names:
        match = regex.match(name)
        unit = match.group(1) if match else name
        units.setdefault(unit, []).append(name)
        order[unit] = (0, int(match.group(2)), unit) if match else (1, 0, unit)
    return {unit: units[unit] for unit in sorted(units, key=order.__getitem__)}


def _layers_and_units(tuner, adapter_name: str) -> tuple[dict, dict[str, list[str]]]:
    """The adapted modules by name (one walk of the model) and their allocation units."""
    layers = tuner.aira_moe_layers(adapter_name)
    return layers, allocation_units(layers, tuner.peft_config[adapter_name].layers_pattern)


def _weight_out_in(layer) -> torch.Tensor:
    """The base weight as (out, in) floats; a bitsandbytes-quantised one is dequantised (this module only)."""
    weight = dequantized_weight(layer.get_base_layer())
    return weight.T if layer.fan_in_fan_out else weight  # (out, in)


def collect_for_model(
    tuner, loader, adapter_name: str, max_batches: Optional[int], max_samples: Optional[int] = None, layers=None
) -> dict[str, ChannelStats]:
    """The calibration pass over the base model (adapters disabled, so activations are the frozen model's)."""
    config = tuner.peft_config[adapter_name]
    layers = tuner.aira_moe_layers(adapter_name) if layers is None else layers
    need_outputs = config.use_activation_aware and config.activation_aware_mode == "outps"
    base_modules = {name: layer.get_base_layer() for name, layer in layers.items()}
    previously_disabled = {name: layer.disable_adapters for name, layer in layers.items()}
    for layer in layers.values():  # BaseTunerLayer.enable_adapters: public in every supported peft
        layer.enable_adapters(False)
    try:
        return run_calibration_pass(
            tuner.model, base_modules, loader, need_outputs=need_outputs, max_batches=max_batches, max_samples=max_samples
        )
    finally:
        for name, layer in layers.items():
            layer.enable_adapters(not previously_disabled[name])


def layer_importance(
    tuner, stats: dict[str, ChannelStats], adapter_name: str, layers=None, units=None
) -> dict[str, float]:
    """theta per allocation unit = mean over its modules of LOD (``theta_type='lod'``) or mean |x| ('act')."""
    config = tuner.peft_config[adapter_name]
    if layers is None:
        layers, units = _layers_and_units(tuner, adapter_name)
    importance = {}
    for unit, names in units.items():
        scores = []
        for name in names:
            if config.theta_type == "act":
                scores.append(activation_importance(stats[name]))
            else:
                weight = layers[name].get_base_layer().weight
                with gathered([weight]):
                    scores.append(lod_score(_weight_out_in(layers[name]), input_channel_norms(stats[name]), config.lod_threshold_M,
                                            config.lod_reference))
        importance[unit] = sum(scores) / len(scores)
    return importance


def check_allocation_inputs(tuner, adapter_name: str, units=None) -> int:
    """Validate the budget against the model's layers before any forward pass; returns the resolved budget."""
    config = tuner.peft_config[adapter_name]
    units = _layers_and_units(tuner, adapter_name)[1] if units is None else units
    return resolve_budget(config.rank_budget, len(units), config.r, config.min_rank, config.max_rank)


def solve_allocation(config, importance: dict[str, float], objective_function: Optional[str] = None,
                     budget: Optional[int] = None) -> dict[str, int]:
    """Ranks per unit; ``budget`` is the resolved budget when the caller has it (else resolved from the config)."""
    if budget is None:
        budget = resolve_budget(config.rank_budget, len(importance), config.r, config.min_rank, config.max_rank)
    ranks = allocate_ranks(
        list(importance.values()), budget, config.min_rank, config.max_rank, objective_function or config.objective_function
    )
    # every rank must build the same shapes: take rank 0's solution
    ranks = broadcast_from_main(torch.tensor(ranks, dtype=torch.int64, device=_comm_device())).tolist()
    return dict(zip(importance, ranks))


def _comm_device() -> torch.device:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def apply_allocation(tuner, allocation: dict[str, int], adapter_name: str, layers=None, units=None) -> dict[str, int]:
    """Rebuild each module with its unit's rank; the per-module ranks go into ``rank_pattern`` (saved with the
    adapter, so every loader rebuilds the same shapes)."""
    config = tuner.peft_config[adapter_name]
    if layers is None:
        layers, units = _layers_and_units(tuner, adapter_name)
    missing = set(units) - set(allocation)
    if missing:
        raise ValueError(f"allocation has no rank for layers {sorted(missing)}")
    pattern = {}
    for unit, names in units.items():
        for name in names:
            kwargs = config.layer_kwargs(name)
            kwargs["r"] = int(allocation[unit])
            layers[name].update_layer(adapter_name, **kwargs)
            pattern[name] = int(allocation[unit])
    config.rank_pattern = pattern
    tuner.set_adapter(tuner.active_adapters)  # re-apply requires_grad / inference mode to the new parameters
    if config.inference_mode:
        tuner.set_requires_grad(adapter_name, False)
    return pattern


def _module_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def _set_channel_weights(layers: dict, stats: dict[str, ChannelStats], config, adapter_name: str) -> None:
    for name, layer in layers.items():
        scores = channel_scores(stats[name], config.activation_aware_mode, config.activation_normalize)
        layer.set_channel_scale(adapter_name, broadcast_from_main(scores.contiguous()))


def _awsvd_init(layers: dict, stats: dict[str, ChannelStats], config, adapter_name: str) -> None:
    """AwSVD per module: initial A directions ('directions') or the initial update pair ('residual')."""
    for name, layer in tqdm(layers.items(), desc="aira_moe AwSVD init", disable=not is_main_process(), unit="module"):
        weight = layer.get_base_layer().weight
        rank = layer.r[adapter_name]
        num_A = layer.aira_moe_A[adapter_name].shape[0]
        count = rank * num_A if config.awsvd_mode == "directions" else rank
        with gathered([weight]):
            full = _weight_out_in(layer)
            if count > min(full.shape):
                raise UserError(f"AwSVD needs {count} directions of {name!r} but it has only min{tuple(full.shape)}; "
                                "lower `max_rank` / `r`" + (" or `num_A`" if num_A > 1 else ""))
            svd_args = dict(solver=config.awsvd_solver, niter=config.awsvd_niter, oversample=config.awsvd_oversample,
                            generator=torch.Generator().manual_seed(_module_seed(config.cola_seed, name)))
            if config.awsvd_mode == "directions":
                directions = awsvd_directions(full.detach(), input_rms(stats[name]), count, **svd_args)
            else:
                factor_A, factor_B = awsvd_factors(full.detach(), input_rms(stats[name]), rank,
                                                   split=config.awsvd_split, **svd_args)
        if config.awsvd_mode == "directions":
            if config.use_activation_aware and config.activation_aware_mode == "inps":
                # the *weighted* A rows (A diag(w)) are the directions; outps weights act on B, which starts at 0
                directions = divide_out_input_weights(directions, layer.aira_moe_channel_scale[adapter_name])
            layer.set_initial_directions(adapter_name, broadcast_from_main(directions.contiguous()))
            continue
        layer.set_initial_update(adapter_name, broadcast_from_main(factor_A.contiguous()), broadcast_from_main(factor_B.contiguous()))


def calibrate_model(tuner, loader, adapter_name: str, max_batches: Optional[int] = None, report_dir: Optional[str] = None):
    """One calibration pass, then every technique enabled in the adapter's config. Returns the report dict. The
    adapted modules are found once (the same module objects stay in place when allocation rebuilds their factors),
    and the budget is resolved once, before the pass."""
    config = tuner.peft_config[adapter_name]
    if config.calibrated:
        raise UserError(
            f"adapter {adapter_name!r} is already calibrated (`calibrated=True`): its ranks, initial factors and channel "
            "scores are reused as saved, never recomputed"
        )
    if not config.needs_calibration:
        logger.info("aira_moe: no activation-aware technique enabled; calibration skipped")
        return None
    layers, units = _layers_and_units(tuner, adapter_name)
    budget = check_allocation_inputs(tuner, adapter_name, units) if config.use_layer_wise_rank else None
    seconds = {}

    start = time.perf_counter()
    stats = collect_for_model(tuner, loader, adapter_name, max_batches=max_batches or config.awsvd_collect_steps,
                              layers=layers)
    seconds["collect"] = time.perf_counter() - start

    importance = None
    if config.use_layer_wise_rank:
        start = time.perf_counter()
        importance = layer_importance(tuner, stats, adapter_name, layers, units)
        unit_ranks = solve_allocation(config, importance, budget=budget)
        apply_allocation(tuner, unit_ranks, adapter_name, layers, units)
        seconds["allocate"] = time.perf_counter() - start
    else:
        unit_ranks = {unit: layers[names[0]].r[adapter_name] for unit, names in units.items()}

    if config.use_activation_aware:
        _set_channel_weights(layers, stats, config, adapter_name)
    if config.use_awsvd_init:
        start = time.perf_counter()
        _awsvd_init(layers, stats, config, adapter_name)
        seconds["awsvd"] = time.perf_counter() - start

    # the LoRA-style random A experts (and a router) too: every rank starts from rank 0's weights
    for layer in layers.values():
        for table in (getattr(layer, name) for name in layer.adapter_layer_names):
            if adapter_name in table:
                broadcast_from_main(table[adapter_name].data)
    config.calibrated = True

    router = {name: router_parameters(config.num_A, config.num_B, layer.in_features, config.router_input)
              if config.token_dependent else (0, 0) for name, layer in layers.items()}
    report = build_report(
        units=units,
        importance=importance,
        unit_ranks=unit_ranks,
        params_per_rank={
            name: config.num_A * layer.in_features + config.num_B * layer.out_features + router[name][0]
            for name, layer in layers.items()
        },
        params_fixed={name: per_module[1] for name, per_module in router.items()},
        uniform_r=config.r,
        config_summary={
            key: getattr(config, key)
            for key in ("r", "num_A", "num_B", "cola_strategy", "use_layer_wise_rank", "theta_type", "lod_threshold_M",
                        "min_rank", "max_rank", "objective_function", "use_awsvd_init", "use_activation_aware",
                        "activation_aware_mode", "activation_normalize", "awsvd_collect_steps")
        } | {"rank_budget": budget if budget is not None else config.rank_budget}
          | ({"router_input": config.router_input} if config.token_dependent else {}),
        seconds=seconds,
    )
    if is_main_process():
        logger.info("aira_moe allocation:\n%s", format_table(report))
        if report_dir:
            report["files"] = write_report(report, report_dir)
    return report
