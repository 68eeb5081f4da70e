"""AiraMoeModel: injects AiraMoe layers and runs the calibration-driven techniques."""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn as nn
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

from ..errors import UserError
from .config import AiraMoeConfig
from .layer import AiraMoeLayer, Linear, StepCounter


class AiraMoeModel(BaseTuner):
    """Wraps a transformers model with AiraMoe adapters; see ``AiraMoeConfig``.

    Example::

        >>> from peft import get_peft_model
        >>> from aira_moe import AiraMoeConfig
        >>> model = get_peft_model(base_model, AiraMoeConfig(r=8, num_A=2, num_B=3, target_modules=["q_proj", "v_proj"]))
        >>> model.calibrate(train_loader)  # only needed when a technique (allocation, AwSVD, weighting) is enabled
    """

    prefix: str = "aira_moe_"
    tuner_layer_cls = AiraMoeLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def _pre_injection_hook(self, model: nn.Module, config: AiraMoeConfig, adapter_name: str) -> None:
        if not hasattr(self, "step_counter"):
            self.step_counter = StepCounter()
            # one tick per training forward of the whole model: the 'random' pairing changes per step, identically on
            # every rank, and stays fixed while gradient checkpointing recomputes layers of that step; the routing
            # losses recorded in a step belong to it (StepCounter.routing). PeftModel calls
            # either this tuner (which calls model.forward, no hooks) or the wrapped model directly: exactly one fires.
            self.register_forward_pre_hook(self._count_training_step)
            model.register_forward_pre_hook(self._count_training_step)

    def _count_training_step(self, module: nn.Module, args) -> None:
        if module.training:
            self.step_counter.value += 1

    def routing_loss(self) -> Optional[torch.Tensor]:
        """The load-balancing loss of the token-dependent ('routed') layers in the last training forward: per adapter,
        its ``router_aux_loss_coef`` times the mean over its layers, summed over adapters; None when no such layer ran
        in that forward. ``add_routing_loss`` adds it to a training loss."""
        return self.step_counter.routing.loss(self.step_counter.value,
                                              lambda adapter_name: self.peft_config[adapter_name].router_aux_loss_coef)

    def add_routing_loss(self, loss: torch.Tensor, share: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``loss`` plus ``routing_loss()`` (times ``share`` when given), or ``loss`` itself when no token-dependent
        layer ran: how a routed adapter's routers get their load-balancing loss. Call it on the loss of each training
        forward (the LLaMA-Factory seam and the benchmarks do). ``share``: this micro-batch's share of the tokens the
        loss is normalised over, when gradient accumulation normalises by the whole batch (the Trainer's
        ``num_items_in_batch``), so that accumulation does not multiply the coefficient."""
        extra = self.routing_loss()
        if extra is None:
            return loss
        return loss + (extra if share is None else extra * share)

    def routing_summary(self) -> dict[str, float]:
        """Means since the last call of the routed layers' load-balancing loss, gate entropy and expert load (see
        strategies.routed.RoutingLog.summary); empty without routed layers."""
        return self.step_counter.routing.summary()

    def _create_and_replace(
        self,
        config: AiraMoeConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs,
    ) -> None:
        if current_key is None:
            raise ValueError("Current Key shouldn't be `None`")
        update_kwargs = config.layer_kwargs(current_key)
        if isinstance(target, AiraMoeLayer):
            target.update_layer(adapter_name, **update_kwargs)
            return
        new_module = self._create_new_module(config, adapter_name, target, current_key, self.step_counter, **update_kwargs)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter is not trainable until set active
        self._replace_module(parent, target_name, new_module, target)

    @staticmethod
    def _create_new_module(config, adapter_name, target, current_key, step_counter, **update_kwargs) -> nn.Module:
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        is_conv1d = type(base).__name__ == "Conv1D"
        if not isinstance(base, nn.Linear) and not is_conv1d:
            raise UserError(
                f"`target_modules` matched {current_key!r}, a {type(base).__name__}; AiraMoe adapts only torch.nn.Linear "
                "(and transformers Conv1D) modules."
            )
        if is_conv1d and not config.fan_in_fan_out:
            raise UserError(f"{current_key!r} is a Conv1D with an (in, out) weight: set `fan_in_fan_out=True`.")
        if not is_conv1d and config.fan_in_fan_out:
            raise UserError(f"`fan_in_fan_out=True` but {current_key!r} is a torch.nn.Linear: set `fan_in_fan_out=False`.")
        return Linear(
            target,
            adapter_name,
            step_counter=step_counter,
            layer_key=current_key,
            fan_in_fan_out=config.fan_in_fan_out,
            **update_kwargs,
        )

    def _check_new_adapter_config(self, config: AiraMoeConfig) -> None:
        super()._check_new_adapter_config(config)
        awsvd_adapters = [name for name, conf in self.peft_config.items() if getattr(conf, "use_awsvd_init", False)]
        if len(awsvd_adapters) > 1:
            raise UserError(
                f"Only one adapter per model may use `use_awsvd_init` (it rewrites the base weight); found {awsvd_adapters}."
            )

    # ------------------------------------------------------------------ helpers

    def aira_moe_layers(self, adapter_name: Optional[str] = None) -> dict[str, Linear]:
        """Adapted modules by name (names relative to the wrapped model, as in ``rank_pattern``)."""
        adapter_name = adapter_name or self.active_adapters[0]
        return {
            name: module
            for name, module in self.model.named_modules()
            if isinstance(module, AiraMoeLayer) and adapter_name in module.aira_moe_A
        }

    # ------------------------------------------------------------------ calibration API (see tuner/calibrate.py)

    def compute_layer_importance(
        self, loader: Iterable[dict], max_samples: int = 1000, adapter_name: Optional[str] = None
    ) -> dict[str, float]:
        """Run a calibration pass over at most ``max_samples`` sequences and return theta per allocation unit."""
        from .calibrate import collect_for_model, layer_importance

        adapter_name = adapter_name or self.active_adapters[0]
        stats = collect_for_model(self, loader, adapter_name, max_batches=None, max_samples=max_samples)
        return layer_importance(self, stats, adapter_name)

    def optimize_layer_ranks(
        self, importance: dict[str, float], objective_function: Optional[str] = None, adapter_name: Optional[str] = None
    ) -> dict[str, int]:
        """Solve the rank allocation exactly for the given importance; returns rank per allocation unit."""
        from .calibrate import solve_allocation

        adapter_name = adapter_name or self.active_adapters[0]
        return solve_allocation(self.peft_config[adapter_name], importance, objective_function)

    def apply_layer_wise_ranks(self, allocation: dict[str, int], adapter_name: Optional[str] = None) -> dict[str, int]:
        """Rebuild every adapted module with the rank of its allocation unit; records the result in ``rank_pattern``."""
        from .calibrate import apply_allocation

        adapter_name = adapter_name or self.active_adapters[0]
        return apply_allocation(self, allocation, adapter_name)

    def calibrate(
        self,
        loader: Iterable[dict],
        max_batches: Optional[int] = None,
        adapter_name: Optional[str] = None,
        report_dir: Optional[str] = None,
    ):
        """One calibration pass (``max_batches`` or ``awsvd_collect_steps`` batches), then every technique enabled in
        the config: layer-wise ranks, AwSVD initialisation, activation-aware weighting. Returns the report."""
        from .calibrate import calibrate_model

        adapter_name = adapter_name or self.active_adapters[0]
        return calibrate_model(self, loader, adapter_name, max_batches=max_batches, report_dir=report_dir)

