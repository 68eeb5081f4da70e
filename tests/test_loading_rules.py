"""aira_moe follows LLaMA-Factory's LoRA rules for loading and casting adapters (``_setup_lora_tuning`` /
``init_adapter`` in llamafactory/model/adapter.py), checked against LLaMA-Factory's own LoRA path in the same process."""


import pytest
import torch

pytest.importorskip("llamafactory")

from conftest import make_tiny_llama  # noqa: E402

from aira_moe import AiraMoeConfig  # noqa: E402


def lf_args(finetuning_type, **model_overrides):
    from llamafactory.hparams import FinetuningArguments, ModelArguments

    finetuning = {key: model_overrides.pop(key) for key in ("pure_bf16", "create_new_adapter", "additional_target")
                  if key in model_overrides}
    model_args = ModelArguments(model_name_or_path="unused", **model_overrides)
    return model_args, FinetuningArguments(finetuning_type=finetuning_type, lora_rank=2, lora_target="all", **finetuning)


@pytest.fixture
def zero3(request):
    """DeepSpeed ZeRO-3 switched on for this process (transformers reads a global), as a ZeRO-3 launch does."""
    pytest.importorskip("deepspeed")
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, is_deepspeed_zero3_enabled

    config = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
    assert is_deepspeed_zero3_enabled()
    yield config
    del config


def trainable_dtypes(finetuning_type, **overrides):
    from llamafactory.model.adapter import init_adapter

    model = make_tiny_llama(dtype=torch.bfloat16)
    model_args, finetuning_args = lf_args(finetuning_type, **overrides)
    model = init_adapter(model.config, model, model_args, finetuning_args, is_trainable=True)
    return {param.dtype for param in model.parameters() if param.requires_grad}


# peft already keeps adapter weights in fp32 (autocast_adapter_dtype); a trained copy of lm_head (`additional_target`)
# is where the cast rule shows
CASES = [{}, {"pure_bf16": True}, {"quantization_bit": 4}]
HEAD = {"additional_target": "lm_head"}


@pytest.mark.parametrize("overrides", CASES, ids=["default", "pure_bf16", "qlora"])
def test_trainable_params_are_cast_as_lora_casts_them(overrides):
    lora = trainable_dtypes("lora", **overrides, **HEAD)
    assert trainable_dtypes("aira_moe", **overrides, **HEAD) == lora
    assert lora == ({torch.float32, torch.bfloat16} if overrides.get("pure_bf16") else {torch.float32})


@pytest.mark.parametrize("overrides, want", [({}, {torch.float32, torch.bfloat16}), ({"quantization_bit": 4}, {torch.float32})],
                         ids=["zero3", "qlora_zero3"])
def test_under_zero3_only_qlora_is_cast_to_fp32_as_for_lora(zero3, overrides, want):
    assert trainable_dtypes("lora", **overrides, **HEAD) == trainable_dtypes("aira_moe", **overrides, **HEAD) == want


def save_adapter(directory):
    torch.manual_seed(0)
    from peft import get_peft_model

    model = get_peft_model(make_tiny_llama(), AiraMoeConfig(r=2, num_A=2, num_B=2, target_modules=["q_proj"],
                                                            init_weights=False))
    model.save_pretrained(directory)
    return directory


def test_adapter_folder_is_passed_like_lora_and_zero3_keeps_the_adapter_unmerged(tmp_path, zero3):
    """`adapter_folder` (a subfolder of each adapter path) reaches peft; under ZeRO-3 the adapter is not mergeable,
    so it stays a PeftModel, and more than one adapter is refused naming the count."""
    from llamafactory.model.adapter import init_adapter
    from peft import PeftModel

    save_adapter(tmp_path / "run" / "final")
    model_args, finetuning_args = lf_args("aira_moe", adapter_name_or_path=str(tmp_path / "run"),
                                          adapter_folder="final")
    model = init_adapter(None, make_tiny_llama(), model_args, finetuning_args, is_trainable=False)
    assert isinstance(model, PeftModel) and model.peft_config["default"].peft_type == "AIRA_MOE"
    model_args.adapter_name_or_path = [str(tmp_path / "run"), str(tmp_path / "run")]
    with pytest.raises(ValueError, match="lists 2 adapters, but DeepSpeed ZeRO-3 partitions the base model"):
        init_adapter(None, make_tiny_llama(), model_args, finetuning_args, is_trainable=False)


def test_create_new_adapter_merges_the_given_ones_and_trains_a_fresh_one(tmp_path):
    from llamafactory.model.adapter import init_adapter

    from aira_moe.tuner import AiraMoeLayer

    save_adapter(tmp_path / "old")
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    from peft import PeftModel

    with torch.no_grad():
        want = PeftModel.from_pretrained(make_tiny_llama(), str(tmp_path / "old"))(ids).logits
    model_args, finetuning_args = lf_args("aira_moe", adapter_name_or_path=str(tmp_path / "old"),
                                          create_new_adapter=True)
    finetuning_args.use_layer_wise_rank = finetuning_args.use_awsvd_init = finetuning_args.use_activation_aware = False
    model = init_adapter(None, make_tiny_llama(), model_args, finetuning_args, is_trainable=True)
    layers = [m for m in model.modules() if isinstance(m, AiraMoeLayer)]
    assert len(layers) == 14 and all(not layer.merged for layer in layers)  # fresh adapter on every linear
    with torch.no_grad():  # the new adapter starts at zero: the output is the merged old adapter's
        assert ((model(ids).logits - want).abs().max()).item() < 1e-5
