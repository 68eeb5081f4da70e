"""The aira_moe training arguments (YAML keys), generated from AiraMoeConfig, and their translation back into an
AiraMoeConfig; no LLaMA-Factory import."""

from __future__ import annotations

import dataclasses
import typing
from typing import Optional, Union

from ..errors import UserError
from ..tuner.config import AiraMoeConfig

# AiraMoeConfig fields that are YAML keys under their own name. LoRA's keys keep their LLaMA-Factory names and meaning:
# lora_rank -> r, lora_alpha, lora_dropout, lora_target -> target_modules, additional_target -> modules_to_save,
# use_rslora, use_dora.
METHOD_KEYS = (
    "num_A", "num_B", "cola_strategy", "cola_seed", "router_top_k", "router_input", "router_aux_loss_coef",
    "use_layer_wise_rank", "theta_type", "lod_threshold_M", "lod_reference", "rank_budget", "min_rank", "max_rank",
    "layer_scaling", "objective_function",
    "use_awsvd_init", "awsvd_mode", "awsvd_collect_steps", "awsvd_solver", "awsvd_niter", "awsvd_oversample", "awsvd_split",
    "use_activation_aware", "activation_aware_mode", "activation_normalize",
)


def _argument_type(annotation):
    """HfArgumentParser takes bool / int / float / str / Literal; a Union of several (``rank_budget`` int or 'auto',
    ``activation_normalize`` name or bool) is read as str and parsed by AiraMoeConfig."""
    if typing.get_origin(annotation) is Union and type(None) not in typing.get_args(annotation):
        return str
    return annotation


def _make_arguments_class():
    hints = typing.get_type_hints(AiraMoeConfig)
    config_fields = {item.name: item for item in dataclasses.fields(AiraMoeConfig)}
    specs = []
    for name in METHOD_KEYS:
        item = config_fields[name]
        help_text = item.metadata["help"].strip() + " (aira_moe)"
        specs.append((name, _argument_type(hints[name]), dataclasses.field(default=item.default, metadata={"help": help_text})))
    arguments = dataclasses.make_dataclass("AiraMoeArguments", specs)
    arguments.__doc__ = ("Arguments of ``finetuning_type: aira_moe``, generated from AiraMoeConfig (one copy of each "
                         "key's type, default, choices and help).")
    arguments.__module__ = __name__
    return arguments


AiraMoeArguments = _make_arguments_class()

# keys that only act when a switch is on, in the order they are checked: (the switch as a YAML line, whether it is on,
# the keys it activates). A key set away from its default with its switch off would train as if it were absent.
SWITCHES = (
    ("`use_layer_wise_rank: true`", lambda config: config.use_layer_wise_rank,
     ("theta_type", "lod_threshold_M", "lod_reference", "rank_budget", "min_rank", "max_rank", "layer_scaling",
      "objective_function")),
    ("`theta_type: lod`", lambda config: config.theta_type == "lod", ("lod_threshold_M", "lod_reference")),
    ("`use_awsvd_init: true`", lambda config: config.use_awsvd_init,
     ("awsvd_mode", "awsvd_solver", "awsvd_niter", "awsvd_oversample", "awsvd_split")),
    ("`awsvd_mode: residual`", lambda config: config.awsvd_mode == "residual", ("awsvd_split",)),
    ("`use_activation_aware: true`", lambda config: config.use_activation_aware,
     ("activation_aware_mode", "activation_normalize")),
    ("`cola_strategy: routed`", lambda config: config.token_dependent, ("router_aux_loss_coef",)),
    ("one of `use_layer_wise_rank` / `use_awsvd_init` / `use_activation_aware`",
     lambda config: config.needs_calibration,
     ("awsvd_collect_steps",)),
)


def refuse_inert_keys(config: AiraMoeConfig) -> None:
    """A key whose switch is off is an error naming the key and the switch (as aira_moe keys under another
    finetuning_type are): silently ignoring it would train something other than what the YAML says."""
    defaults = {item.name: item.default for item in dataclasses.fields(AiraMoeConfig)}
    for switch, is_on, keys in SWITCHES:
        if is_on(config):
            continue
        inert = [key for key in keys if getattr(config, key) != defaults[key]]
        if inert:
            named = ", ".join(f"`{key}`={getattr(config, key)!r}" for key in inert)
            raise UserError(f"{named} {'has' if len(inert) == 1 else 'have'} no effect without {switch}; set that "
                            f"or remove {'it' if len(inert) == 1 else 'them'}.")


def peft_config_from_args(args, inference_mode: bool = False, init_weights: bool = True) -> AiraMoeConfig:
    """AiraMoeConfig from parsed arguments (LLaMA-Factory's FinetuningArguments extended with AiraMoeArguments); the
    config parses ``rank_budget`` and validates every key, naming it, and a key whose switch is off is refused."""
    if isinstance(args.lora_rank, bool) or not isinstance(args.lora_rank, int) or args.lora_rank < 1:
        raise UserError(f"`lora_rank` must be an integer >= 1, got {args.lora_rank!r}.")
    targets = list(args.lora_target)
    target_modules: Optional[Union[list[str], str]] = "all-linear" if targets == ["all"] else targets
    config = AiraMoeConfig(
        r=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=target_modules,
        modules_to_save=list(args.additional_target) if args.additional_target else None,
        use_rslora=args.use_rslora,
        use_dora=args.use_dora,  # LLaMA-Factory's own key, same meaning: a trained magnitude per output channel
        inference_mode=inference_mode,
        init_weights=init_weights,
        task_type="CAUSAL_LM",
        **{name: getattr(args, name) for name in METHOD_KEYS},
    )
    refuse_inert_keys(config)
    return config
