"""Pre-flight checks of a ``llamafactory-cli train`` config that read only small files (config.json,
dataset_info.json, trainer_state.json): they run before the model or the data are loaded. No llamafactory import."""

from __future__ import annotations

import json
import os
from typing import Optional

from ..adapter_paths import AdapterFileError, read_json_file
from ..errors import MissingFileError, UserError


def count_decoder_layers(model_name_or_path: str) -> Optional[int]:
    """num_hidden_layers from the model's config.json (cheap: no weights), or None when it cannot be read locally."""
    path = os.path.join(model_name_or_path, "config.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        config = json.load(handle)
    config = config.get("text_config", config)
    return config.get("num_hidden_layers")


def check_budget_early(model_args, finetuning_args) -> None:
    from ..calibration.allocation import resolve_budget

    if not finetuning_args.use_layer_wise_rank or model_args.adapter_name_or_path:
        return
    num_layers = count_decoder_layers(model_args.model_name_or_path)
    if num_layers is None:
        return  # a hub id: checked again, against the loaded model, before calibration
    resolve_budget(finetuning_args.rank_budget, num_layers, finetuning_args.lora_rank, finetuning_args.min_rank,
                   finetuning_args.max_rank)


def check_lora_target(model_args, finetuning_args) -> None:
    """Every ``lora_target`` name must match a Linear module of the model (peft's rule: the full name or its dotted
    suffix). Read from a local config.json on the meta device, so no weight is loaded; a hub id, or a config that is
    not a causal LM (a vision-language model is loaded by another class), is checked when the model loads."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    targets = list(finetuning_args.lora_target)
    path = model_args.model_name_or_path
    if targets == ["all"] or not os.path.isfile(os.path.join(path, "config.json")):
        return
    config = AutoConfig.from_pretrained(path, trust_remote_code=model_args.trust_remote_code)
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=model_args.trust_remote_code)
    linear = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    missing = [target for target in targets
               if not any(name == target or name.endswith("." + target) for name in linear)]
    if missing:
        available = sorted({name.rsplit(".", 1)[-1] for name in linear})
        raise UserError(f"`lora_target` {', '.join(missing)} names no Linear module of {path} (its Linear modules: "
                        f"{', '.join(available)}; or `lora_target: all`)")


def check_datasets(args: dict) -> int:
    """Every name in ``dataset`` / ``eval_dataset`` must be registered in ``dataset_dir``/dataset_info.json."""
    dataset_dir = args.get("dataset_dir", "data")
    names = []
    for key in ("dataset", "eval_dataset"):
        value = args.get(key) or []
        names += [(key, name.strip()) for name in (value.split(",") if isinstance(value, str) else value) if name.strip()]
    if not names or dataset_dir == "ONLINE":
        return len(names)
    info_path = os.path.join(dataset_dir, "dataset_info.json")
    if not os.path.isfile(info_path):
        raise MissingFileError(f"no dataset_info.json in `dataset_dir`={os.path.abspath(dataset_dir)!r}")
    with open(info_path, encoding="utf-8") as handle:
        known = json.load(handle)
    for key, name in names:
        if name not in known:
            raise UserError(f"`{key}` {name!r} is not registered in {os.path.abspath(info_path)} "
                            f"(known: {', '.join(sorted(known))})")
    return len(names)


class CompletedRunError(UserError):
    """``output_dir`` holds this same run, finished: training it again would do nothing and overwrite nothing. Not a
    failure: a training run that meets it ends after its one line with exit code 0."""

    exit_code = 0


def refuse_completed_run(training_args) -> None:
    """CompletedRunError when ``output_dir`` holds this run, finished (see ``completed_run``)."""
    state = completed_run(training_args)
    if state is not None:
        raise CompletedRunError(
            f"the run in {training_args.output_dir} is complete ({state['global_step']} of {state['max_steps']} "
            "steps); nothing is trained and nothing there is overwritten. To train again, set "
            "`overwrite_output_dir: true` or choose another `output_dir`."
        )


def completed_run(training_args) -> Optional[dict]:
    """The trainer state of a finished run in ``output_dir`` that this run would only repeat, else None. A finished
    run has its adapter, all_results.json and a trainer_state.json with global_step == max_steps; asking for more
    steps than it ran is a continuation, not a repeat."""
    directory = training_args.output_dir
    if (not training_args.do_train or getattr(training_args, "overwrite_output_dir", False)
            or training_args.resume_from_checkpoint is not None or not os.path.isdir(directory)):
        return None
    needed = ("trainer_state.json", "all_results.json", "adapter_config.json")
    if not all(os.path.isfile(os.path.join(directory, name)) for name in needed):
        return None
    try:
        state = read_json_file(os.path.join(directory, "trainer_state.json"))
    except AdapterFileError:  # killed while writing it: the run did not finish
        return None
    done, planned = state.get("global_step", 0), state.get("max_steps", 0)
    if planned <= 0 or done < planned:
        return None
    if training_args.max_steps > 0 and training_args.max_steps > planned:
        return None
    return state
