"""What a token-dependent ('routed') adapter needs from a LLaMA-Factory run: its load-balancing loss in the training
loss, its routing statistics in the log, non-reentrant checkpointing, and the refusal to merge it. No llamafactory
import."""

from __future__ import annotations

from .._logging import get_logger
from ..adapter_paths import adapter_strategy, token_dependent_adapters

logger = get_logger()


def refuse_exporting_token_dependent(model_args) -> None:
    """``llamafactory-cli export`` merges the adapters into the weights: one whose update depends on the token cannot
    be merged; refused before the model is loaded."""
    if not model_args.export_dir:
        return
    routed = token_dependent_adapters(model_args.adapter_name_or_path, model_args.adapter_folder)
    if routed:
        strategy = adapter_strategy(routed[0], model_args.adapter_folder)
        strategy.refuse_token_dependent("merged by `llamafactory-cli export`", source=routed[0])


def use_non_reentrant_checkpointing_for_routing(model_args, finetuning_args) -> None:
    """A token-dependent ('routed') adapter records its load-balancing loss inside the checkpointed decoder layers;
    reentrant checkpointing runs them without autograd, so that loss could not train the router (LLaMA-Factory itself
    switches for fsdp2)."""
    from ..tuner.strategies import get_strategy

    if get_strategy(finetuning_args.cola_strategy).token_dependent and model_args.use_reentrant_gc:
        model_args.use_reentrant_gc = False
        logger.info("aira_moe: `cola_strategy: routed` uses non-reentrant gradient checkpointing "
                    "(`use_reentrant_gc` set to false) so that its load-balancing loss reaches the router.")


def add_routing_loss_to_training_loss(model):
    """A token-dependent ('routed') adapter: add the routers' load-balancing loss to the loss in the model's output,
    the loss every Trainer backpropagates (``AiraMoeModel.add_routing_loss``) -- a forward hook, so no trainer class is
    touched. When the Trainer normalises the loss by the tokens of the whole accumulated batch
    (``num_items_in_batch``), each micro-batch adds its share. Returns the hook's handle (None without such an
    adapter)."""
    tuner = model.base_model
    if not any(config.token_dependent for config in model.peft_config.values()):
        return None

    def add_routing_loss(module, args, kwargs, output):
        if not module.training or not isinstance(output, dict) or output.get("loss") is None:
            return None
        items, labels = kwargs.get("num_items_in_batch"), kwargs.get("labels")
        share = labels.ne(-100).sum() / items if items is not None and labels is not None else None
        output["loss"] = tuner.add_routing_loss(output["loss"], share)
        return output

    return model.register_forward_hook(add_routing_loss, with_kwargs=True)


def routing_log_callback():
    """A TrainerCallback that adds the routed layers' means since the last log (router_aux_loss, routing_entropy,
    expert_load_min / _max) to the Trainer's log history and prints them; nothing for other adapters."""
    from transformers import TrainerCallback

    class RoutingLogCallback(TrainerCallback):
        def on_log(self, args, state, control, model=None, logs=None, **kwargs):
            summary = getattr(getattr(model, "base_model", None), "routing_summary", dict)()
            if not summary or logs is None or "loss" not in logs:
                return
            rounded = {key: round(value, 4) for key, value in summary.items()}
            logs.update(rounded)
            if state.log_history:
                state.log_history[-1].update(rounded)
            if state.is_world_process_zero:
                logger.info("aira_moe routing at step %d: %s", state.global_step,
                            ", ".join(f"{key} {value}" for key, value in rounded.items()))

    return RoutingLogCallback()
