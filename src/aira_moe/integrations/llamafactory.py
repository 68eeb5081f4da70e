"""``finetuning_type: aira_moe`` for stock LLaMA-Factory -- the only module that imports llamafactory.

``install()`` runs once, right after ``import llamafactory`` (armed by the aira_moe_startup.pth hook, so torchrun
workers get it too). It patches, in place and by name:

* the argument parser's dataclass tuples: ``FinetuningArguments`` -> a subclass accepting ``aira_moe`` and its keys;
* ``parser._parse_args``: 'did you mean' for a mis-spelt key (``num_a`` -> ``num_A``);
* ``parser._verify_model_args``: lets aira_moe load adapters like LoRA, refuses quantised bases;
* ``parser._check_extra_dependencies``: DDP/label settings LLaMA-Factory applies to LoRA only, and the rank-budget
  check against the model's layer count, before the model is loaded;
* ``model.adapter.init_adapter`` (and the name imported into ``model.loader``): builds / loads the adapter;
* ``data.get_dataset``: keeps the tokenised train split for calibration;
* ``train.trainer_utils.create_ref_model``: DPO / KTO / PPO get no second model copy (the adapter is disabled for
  the reference pass, as for lora);
* ``train.tuner.get_train_args`` (the name the training function parses with, not ``aira-moe check``): the run takes
  its output_dir's lock;
* ``train.tuner._training_function``: adds a callback that writes the 'routed' strategy's routing statistics into
  the training log (inert for every other run); a finished run in output_dir ends it, training nothing (exit 0);
* ``cli.main``: a user error (``errors.UserError``: a bad value, a damaged adapter file, a locked output_dir, a
  refused export) ends in one line and its exit code.
Anything missing raises with the expected LLaMA-Factory version; there is no fallback.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
import sys
from dataclasses import dataclass, field
from typing import Literal, Optional

from aira_moe_startup import unsupported

from .._logging import get_logger
from ..adapter_paths import require_adapter_dirs, token_dependent_adapters
from ..errors import MissingFileError, UserError, one_line, report
from ..tuner.strategies import get_strategy
from . import preflight, routed_training
from .arguments import AiraMoeArguments, peft_config_from_args
from .output_dir import choose_complete_checkpoint, lock_output_dir
from .patching import PATCHED_MARK, missing, replace
from .preflight import CompletedRunError

logger = get_logger()

FINETUNING_TYPE = "aira_moe"
FINETUNING_TYPES = ("lora", "oft", "freeze", "full", FINETUNING_TYPE)


class _State:
    """What the seam learns before the adapter is built: the training arguments and the tokenised train split."""

    training_args = None
    train_dataset = None
    tokenizer = None


_state = _State()


def _is_aira_moe(finetuning_args) -> bool:
    return getattr(finetuning_args, "finetuning_type", None) == FINETUNING_TYPE


def _as_lora(finetuning_args):
    """A copy that LLaMA-Factory's LoRA-only checks accept; the caller's object is left untouched."""
    view = copy.copy(finetuning_args)
    view.finetuning_type = "lora"
    return view


def _make_arguments_class(base):
    @dataclass
    class AiraMoeFinetuningArguments(base, AiraMoeArguments):
        finetuning_type: Literal["lora", "oft", "freeze", "full", "aira_moe"] = field(
            default="lora", metadata={"help": "Which fine-tuning method to use (aira_moe added by the aira-moe package)."}
        )

        def __post_init__(self):
            if not _is_aira_moe(self):
                _refuse_aira_moe_keys_elsewhere(self)
                base.__post_init__(self)
                return
            # LLaMA-Factory's own checks only know its four types; run them as LoRA, then restore the type
            self.finetuning_type = "lora"
            try:
                base.__post_init__(self)
            finally:
                self.finetuning_type = FINETUNING_TYPE
            if self.pissa_init or self.loraplus_lr_ratio is not None:
                raise UserError("`pissa_init` and `loraplus_lr_ratio` are LoRA-only; aira_moe has its own init "
                                "(`use_awsvd_init`).")
            config = peft_config_from_args(self)  # parses and validates every aira_moe key, naming it
            self.rank_budget = config.rank_budget  # an int or 'auto' from here on (the early budget check reads it)
            self.activation_normalize = config.activation_normalize
            note = get_strategy(config.cola_strategy).config_note(config.num_A, config.num_B, config.r)
            if note:  # one line per parse: `llamafactory-cli train` and `aira-moe check` both come through here
                logger.info(note)

    AiraMoeFinetuningArguments.__name__ = "FinetuningArguments"
    AiraMoeFinetuningArguments.__qualname__ = "FinetuningArguments"
    return AiraMoeFinetuningArguments


def _refuse_aira_moe_keys_elsewhere(args) -> None:
    """A near-miss of ``aira_moe`` gets 'did you mean', and aira_moe keys set under another finetuning_type are an
    error instead of being silently ignored (they would train a plain LoRA with no calibration)."""
    kind = getattr(args, "finetuning_type", None)
    if isinstance(kind, str) and kind.strip().lower().replace("-", "_") == FINETUNING_TYPE:
        raise UserError(f"`finetuning_type`={kind!r} is not a method; did you mean {FINETUNING_TYPE!r}?")
    if kind not in FINETUNING_TYPES:  # LLaMA-Factory's own assertion would list the methods without aira_moe
        raise UserError(f"`finetuning_type` must be one of {list(FINETUNING_TYPES)}, got {kind!r}.")
    defaults = {item.name: item.default for item in dataclasses.fields(AiraMoeArguments)}
    changed = sorted(name for name, default in defaults.items() if getattr(args, name) != default)
    if changed:
        raise UserError(
            f"aira_moe keys {changed} are set but `finetuning_type` is {kind!r}, which ignores them; set "
            f"`finetuning_type: {FINETUNING_TYPE}` or remove them."
        )


def check_train_config(args: dict, refuse_complete_run: bool = False) -> str:
    """Validate a ``llamafactory-cli train`` config in this process, as its parser will, without loading the model or
    the data: argument parsing (every aira_moe check included: the rank budget against the model's config.json when
    it is local), the dataset names against dataset_info.json, adapter paths and the DeepSpeed file. Returns a
    one-line summary; raises UserError naming the key (LLaMA-Factory's own argument errors included). Launchers call
    it before torchrun. Beyond the parse: every ``lora_target`` name against the model's modules (built on the meta
    device). A finished run in output_dir is logged (training would do nothing), or refused with
    ``refuse_complete_run``; no lock is taken."""
    try:
        return _check_train_config(args, refuse_complete_run)
    except (FileNotFoundError, ValueError) as error:
        if isinstance(error, UserError):
            raise
        # LLaMA-Factory's and transformers' own checks of the arguments: the user's to fix, as ours are
        raise UserError(one_line(error)) from error


def _check_train_config(args: dict, refuse_complete_run: bool) -> str:
    from llamafactory.hparams import get_train_args

    datasets = preflight.check_datasets(args)
    require_adapter_dirs(args.get("adapter_name_or_path"))
    deepspeed = args.get("deepspeed")
    if deepspeed and not os.path.isfile(deepspeed):
        raise MissingFileError(f"`deepspeed`={deepspeed!r}: no such file")
    # DeepSpeed's engine setup needs the launched processes; the file's existence is what can be checked here
    parsed = {key: value for key, value in args.items() if key != "deepspeed"}
    try:
        model_args, _, training_args, finetuning_args, _ = get_train_args(parsed)
    except CompletedRunError as done:  # nothing would be trained, so nothing else matters
        if refuse_complete_run:
            raise
        logger.warning("aira_moe: %s", one_line(done))
        return f"finetuning_type {FINETUNING_TYPE}, {datasets} dataset(s), output_dir {args.get('output_dir')}"
    if _is_aira_moe(finetuning_args):
        preflight.check_lora_target(model_args, finetuning_args)
    return (f"finetuning_type {finetuning_args.finetuning_type}, {datasets} dataset(s), "
            f"output_dir {training_args.output_dir}")


def _suggest_known_key(args: dict, parser) -> None:
    """An unknown key that is a known one in other case, or nearly (``num_a`` for ``num_A``), gets 'did you mean'
    instead of LLaMA-Factory's list of unused keys."""
    import difflib

    known = {item.name for kind in parser.dataclass_types for item in dataclasses.fields(kind)}
    by_case = {name.lower(): name for name in known}
    for key in args:
        if key in known:
            continue
        close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.85)
        match = by_case.get(key.lower()) or (close[0] if close else None)
        if match:
            raise UserError(f"`{key}` is not a key of llamafactory-cli or aira_moe; did you mean `{match}`?")


def _patched_parse_args(original):
    @functools.wraps(original)
    def parse(parser, args=None, allow_extra_keys=False):
        import llamafactory.hparams.parser as lf_parser

        args = lf_parser.read_args(args)  # the YAML file (+ overrides) as a dict; a flag list is left to the parser
        if isinstance(args, dict) and not allow_extra_keys:
            _suggest_known_key(args, parser)
        return original(parser, args, allow_extra_keys)

    return parse


def _patched_verify_model_args(original):
    @functools.wraps(original)
    def verify(model_args, data_args, finetuning_args):
        if not _is_aira_moe(finetuning_args):
            return original(model_args, data_args, finetuning_args)
        require_adapter_dirs(model_args.adapter_name_or_path, subfolder=model_args.adapter_folder)
        routed_training.refuse_exporting_token_dependent(model_args)
        for key in ("use_unsloth", "use_kt"):  # their LoRA loaders build peft LoRA layers only
            if getattr(model_args, key, False):
                raise UserError(f"`{key}` works with finetuning_type lora only, not aira_moe; remove it.")
        if model_args.quantization_bit is not None:
            method = getattr(model_args.quantization_method, "value", model_args.quantization_method)
            if method != "bnb" or model_args.quantization_bit not in (4, 8):
                raise UserError(
                    f"`quantization_method`={method} with `quantization_bit`={model_args.quantization_bit} cannot be "
                    "used with finetuning_type aira_moe: calibration reads every adapted weight as floats (LOD, AwSVD), "
                    "which is implemented for bitsandbytes only; use `quantization_method: bnb` with "
                    "`quantization_bit: 4` or `8`."
                )
            if finetuning_args.use_dora:  # the layers would refuse it too, after the model is loaded
                raise UserError(f"`use_dora` with `quantization_bit`={model_args.quantization_bit}: aira_moe's DoRA "
                                "normalises W + dW and needs the base weights in full precision; drop one of the two.")
        return original(model_args, data_args, _as_lora(finetuning_args))

    return verify


def _patched_check_extra_dependencies(original):
    @functools.wraps(original)
    def check(model_args, finetuning_args, training_args=None):
        original(model_args, finetuning_args, training_args)
        if not _is_aira_moe(finetuning_args):
            return
        preflight.check_budget_early(model_args, finetuning_args)
        if training_args is None:
            return
        from transformers.training_args import ParallelMode

        preflight.refuse_completed_run(training_args)
        if training_args.do_train:
            if training_args.process_index == 0:  # refuse a live run's output_dir (a training run then takes the
                lock_output_dir(training_args.output_dir, take=False)  # lock: _patched_training_parse)
            choose_complete_checkpoint(training_args)
        _state.training_args = training_args
        routed_training.use_non_reentrant_checkpointing_for_routing(model_args, finetuning_args)
        # what get_train_args does for LoRA only: adapters have no unused parameters (experts are stacked), and
        # DDP + reentrant checkpointing dies with find_unused_parameters=True
        if training_args.parallel_mode == ParallelMode.DISTRIBUTED and training_args.ddp_find_unused_parameters is None:
            training_args.ddp_find_unused_parameters = False
        training_args.label_names = training_args.label_names or ["labels"]

    return check


def _patched_training_parse(original):
    """The parse of a training run (``aira-moe check`` parses with ``hparams.get_train_args`` itself): every check
    passed, the main process takes output_dir's lock for the run."""

    @functools.wraps(original)
    def get_train_args(args=None):
        parsed = original(args)
        training_args, finetuning_args = parsed[2], parsed[3]
        if _is_aira_moe(finetuning_args) and training_args.do_train and training_args.process_index == 0:
            lock_output_dir(training_args.output_dir)
        return parsed

    return get_train_args


def _patched_get_dataset(original):
    @functools.wraps(original)
    def get_dataset(template, model_args, data_args, training_args, stage, tokenizer, processor=None):
        module = original(template, model_args, data_args, training_args, stage, tokenizer, processor)
        _state.train_dataset = module.get("train_dataset")
        _state.tokenizer = tokenizer
        return module

    return get_dataset


def _calibration_loader(batch_size: int, max_batches: int):
    """This rank's calibration batches from the train split LLaMA-Factory prepared; every rank gets the same count
    (ZeRO-3 gathers are collectives, so ranks must run the same number of forwards)."""
    import torch
    import torch.distributed as dist

    from ..tuner.collect import distributed_ready
    from ..calibration.data import calibration_batches

    if _state.train_dataset is None:
        raise UserError(
            "aira_moe calibration needs the training split, but LLaMA-Factory loaded no train_dataset before the "
            "model; set `dataset` (or disable use_layer_wise_rank / use_awsvd_init / use_activation_aware)."
        )
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed_ready() else (0, 1)
    tokenizer = _state.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batches = []
    for batch in calibration_batches(_state.train_dataset, batch_size, pad_id, rank, world):
        batches.append(batch)
        if len(batches) == max_batches:
            break
    if distributed_ready():
        count = torch.tensor([len(batches)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(count, op=dist.ReduceOp.MIN)
        batches = batches[: int(count.item())]
    return batches


def _find_resume_checkpoint() -> Optional[str]:
    args = _state.training_args
    path = getattr(args, "resume_from_checkpoint", None) if args is not None else None
    if path and os.path.isfile(os.path.join(path, "adapter_config.json")):
        return path
    return None


def _adapter_load_kwargs(model_args) -> dict:
    """The options LLaMA-Factory gives ``PeftModel.from_pretrained`` for a LoRA adapter (a hub adapter's subfolder,
    revision, token and cache; the offload folder of a big model)."""
    return {
        "subfolder": model_args.adapter_folder,
        "offload_folder": model_args.offload_folder,
        "cache_dir": model_args.cache_dir,
        "revision": model_args.model_revision,
        "token": model_args.hf_hub_token,
    }


def _merges_loaded_adapters(model, adapters: list, subfolder: Optional[str] = None) -> bool:
    """As for LoRA: loaded adapters are merged into the base unless it is quantised (merging into a quantised weight is
    refused by the layer) or partitioned by ZeRO-3, or an adapter's update depends on the token; then exactly one
    adapter is loaded and kept unmerged."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    routed = token_dependent_adapters(adapters, subfolder)
    reason = ("the base model is quantised" if getattr(model, "quantization_method", None) else
              "DeepSpeed ZeRO-3 partitions the base model" if is_deepspeed_zero3_enabled() else
              f"{routed[0]} is a routed adapter, whose update depends on the token" if routed else None)
    if reason is None:
        return True
    if len(adapters) > 1:
        raise UserError(f"`adapter_name_or_path` lists {len(adapters)} adapters, but {reason}: only one adapter can "
                        "be loaded (unmerged); merge the others into the base first (llamafactory-cli export).")
    return False


def casts_trainable_params_to_fp32(model_args, finetuning_args, is_trainable: bool) -> bool:
    """LLaMA-Factory's rule for trainable parameters: fp32 unless pure bf16 / BAdam keeps them in half precision, or
    ZeRO-3 on an unquantised base (its optimizer keeps fp32 master weights); QLoRA under ZeRO-3 is cast."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_trainable or finetuning_args.pure_bf16 or finetuning_args.use_badam:
        return False
    return not (model_args.quantization_bit is None and is_deepspeed_zero3_enabled())


def _new_adapter(model, finetuning_args):
    """A new trainable adapter: calibrated on the train split, or, on resume, rebuilt from the checkpoint's saved ranks
    (its rank_pattern) without calibration -- the Trainer then loads the checkpoint's weights into it."""
    from peft import get_peft_model

    from ..tuner.config import AiraMoeConfig

    resume = _find_resume_checkpoint()
    if resume is not None:
        peft_config = AiraMoeConfig.from_pretrained(resume)
        peft_config.inference_mode = False
        model = get_peft_model(model, peft_config)
        logger.info("aira_moe: rebuilt adapter from %s for resume (ranks reused, calibration skipped)", resume)
        return model
    peft_config = peft_config_from_args(finetuning_args)
    model = get_peft_model(model, peft_config)
    if peft_config.needs_calibration:
        args = _state.training_args
        batch_size = args.per_device_train_batch_size if args is not None else 1
        loader = _calibration_loader(batch_size, peft_config.awsvd_collect_steps)
        model.calibrate(loader, report_dir=getattr(args, "output_dir", None))
    return model


def setup_aira_moe(config, model, model_args, finetuning_args, is_trainable: bool):
    """What ``init_adapter`` does for aira_moe: load adapters (merged into a float base, kept unmerged on a quantised or
    ZeRO-3 base, as LoRA), continue training the last one, or create a new one, calibrated on the train split -- or, on
    resume, rebuilt from the checkpoint's saved ranks without calibration."""
    import torch
    from peft import PeftModel

    quantization = getattr(model, "quantization_method", None)
    quantization = getattr(quantization, "value", quantization)  # transformers' QuantizationMethod is a str enum
    if is_trainable and quantization is not None and quantization != "bitsandbytes":
        raise UserError(
            f"aira_moe cannot train on a model quantised with {quantization} "
            "(`model_name_or_path` holds a quantised checkpoint): only bitsandbytes 4-/8-bit bases are supported."
        )
    adapters = list(model_args.adapter_name_or_path or [])
    load_kwargs = _adapter_load_kwargs(model_args)
    keep_last = bool(adapters) and ((is_trainable and not finetuning_args.create_new_adapter)
                              or not _merges_loaded_adapters(model, adapters, model_args.adapter_folder))
    to_merge = adapters[:-1] if keep_last else adapters
    for path in to_merge:
        model = PeftModel.from_pretrained(model, path, **load_kwargs).merge_and_unload()
    if to_merge:
        logger.info("aira_moe: merged %d adapter(s): %s", len(to_merge), ", ".join(to_merge))
    if keep_last:
        model = PeftModel.from_pretrained(model, adapters[-1], is_trainable=is_trainable, **load_kwargs)
        logger.info("aira_moe: %s adapter %s (unmerged)", "continuing training of" if is_trainable else "loaded",
                    adapters[-1])
    if not is_trainable:
        return model

    if not keep_last:
        model = _new_adapter(model, finetuning_args)
    routed_training.add_routing_loss_to_training_loss(model)
    if casts_trainable_params_to_fp32(model_args, finetuning_args, is_trainable):
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.to(torch.float32)
    return model


def _patched_training_function(original):
    @functools.wraps(original)
    def training_function(config):
        config = dict(config)
        config["callbacks"] = [*(config.get("callbacks") or []), routed_training.routing_log_callback()]
        try:
            return original(config)
        except CompletedRunError as done:  # the run in output_dir is finished: nothing to train, in every process
            logger.warning("aira_moe: %s", one_line(done))
            return None

    return training_function


def _patched_create_ref_model(original):
    @functools.wraps(original)
    def create_ref_model(model_args, finetuning_args, add_valuehead=False):
        if _is_aira_moe(finetuning_args) and finetuning_args.ref_model is None:
            # as for lora: the trainers run the reference pass with the adapter disabled, no second model copy
            logger.info("aira_moe: the reference model is the base model with the adapter disabled (no copy).")
            return None
        return original(model_args, finetuning_args, add_valuehead)

    return create_ref_model


def _patched_init_adapter(original):
    @functools.wraps(original)
    def init_adapter(config, model, model_args, finetuning_args, is_trainable):
        if not _is_aira_moe(finetuning_args):
            return original(config, model, model_args, finetuning_args, is_trainable)
        return setup_aira_moe(config, model, model_args, finetuning_args, is_trainable)

    return init_adapter


def _patched_cli_main(original):
    @functools.wraps(original)
    def main():
        try:
            return original()
        except UserError as error:  # the one place llamafactory-cli turns a user error into its line and exit code
            return report(error, "[aira_moe] ")

    return main


def install() -> None:
    """Patch LLaMA-Factory (idempotent). Raises if the installed version lacks what is patched."""
    import llamafactory

    problem = unsupported("llamafactory", llamafactory.__version__)
    if problem is not None:
        raise RuntimeError(f"{problem}.")
    import llamafactory.cli as lf_cli
    import llamafactory.data as lf_data
    import llamafactory.data.loader as lf_data_loader
    import llamafactory.hparams as lf_hparams
    import llamafactory.hparams.parser as lf_parser
    import llamafactory.model.adapter as lf_adapter
    import llamafactory.model.loader as lf_loader
    import llamafactory.train.trainer_utils as lf_trainer_utils

    original_args = lf_hparams.FinetuningArguments
    if not getattr(original_args, PATCHED_MARK, False):
        extended = _make_arguments_class(original_args)
        setattr(extended, PATCHED_MARK, True)
        for table_name in ("_TRAIN_ARGS", "_INFER_ARGS", "_EVAL_ARGS"):
            table = getattr(lf_parser, table_name, None)
            if table is None or original_args not in table:
                raise missing(f"llamafactory.hparams.parser.{table_name} with FinetuningArguments")
            table[table.index(original_args)] = extended
        lf_hparams.FinetuningArguments = extended
        lf_parser.FinetuningArguments = extended

    replace(lf_parser, "_parse_args", _patched_parse_args)
    replace(lf_parser, "_verify_model_args", _patched_verify_model_args)
    replace(lf_parser, "_check_extra_dependencies", _patched_check_extra_dependencies)
    replace(lf_adapter, "init_adapter", _patched_init_adapter)
    lf_loader.init_adapter = lf_adapter.init_adapter  # loader imported the name at its import
    replace(lf_data_loader, "get_dataset", _patched_get_dataset)
    lf_data.get_dataset = lf_data_loader.get_dataset  # workflows import it from llamafactory.data
    replace(lf_trainer_utils, "create_ref_model", _patched_create_ref_model)
    replace(lf_cli, "main", _patched_cli_main)  # the llamafactory-cli script imports main after this runs
    for workflow in ("dpo", "kto", "ppo"):  # they import the name; those imported before this point get it here
        module = sys.modules.get(f"llamafactory.train.{workflow}.workflow")
        if module is not None:
            module.create_ref_model = lf_trainer_utils.create_ref_model
    # last: importing the tuner imports every workflow, which must see the names patched above
    import llamafactory.train.tuner as lf_tuner

    replace(lf_tuner, "get_train_args", _patched_training_parse)
    replace(lf_tuner, "_training_function", _patched_training_function)
