"""aira_moe on a bitsandbytes-quantised base (QLoRA), on CPU with real bitsandbytes: calibration dequantises one module
at a time, the quantised weight is never written (an AwSVD residual runs inside the adapter), merge into it is refused,
and an adapter trained on a 4-bit base exports onto the unquantised one."""

import os
import subprocess
import sys

import pytest
import torch
import yaml
from peft import PeftModel, get_peft_model

sys.path.insert(0, os.path.dirname(__file__))

from conftest import random_batches, tiny_llama_config  # noqa: E402

from aira_moe import AiraMoeConfig  # noqa: E402
from aira_moe.tuner.quantized import dequantized_weight, quantization_kind  # noqa: E402

QUANTIZATIONS = ("4bit", "8bit")


def quantization_config(kind: str):
    from transformers import BitsAndBytesConfig

    if kind == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.float32)
    return BitsAndBytesConfig(load_in_8bit=True)


@pytest.fixture(scope="module")
def float_model_dir(tmp_path_factory):
    from transformers import LlamaForCausalLM

    path = tmp_path_factory.mktemp("float_llama")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(path)
    return str(path)


def load(path: str, kind: str = None):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path, quantization_config=quantization_config(kind) if kind else None)
    return model.train()  # bitsandbytes computes a 4-bit eval-mode no-grad CPU forward with another kernel


def all_techniques(mode: str) -> AiraMoeConfig:
    return AiraMoeConfig(r=4, lora_alpha=8, num_A=2, num_B=3, target_modules="all-linear", use_layer_wise_rank=True,
                         rank_budget=8, min_rank=2, max_rank=6, use_awsvd_init=True, awsvd_mode=mode,
                         use_activation_aware=True, awsvd_collect_steps=4)


@pytest.mark.parametrize("kind", QUANTIZATIONS)
def test_dequantised_weight_is_the_float_weight_within_quantisation_error(float_model_dir, kind):
    quantised, reference = load(float_model_dir, kind), load(float_model_dir)
    module = quantised.model.layers[0].mlp.down_proj
    assert quantization_kind(module) == kind and quantization_kind(reference.model.layers[0].mlp.down_proj) is None
    weight = dequantized_weight(module)
    want = reference.model.layers[0].mlp.down_proj.weight
    assert weight.dtype == torch.float32 and weight.shape == want.shape
    # nf4: ~9 % relative error on a Gaussian weight; int8 with a scale per row: < 1 %
    assert ((weight - want).norm() / want.norm()).item() < (0.12 if kind == "4bit" else 0.01)


def test_residual_inside_the_adapter_padded_as_on_cuda_gives_the_same_output_and_gradients(float_model_dir, monkeypatch):
    """On a quantised base the AwSVD residual pair is appended to the adapter's factors, then padded (on CUDA; forced
    on CPU here): same logits and gradients as unpadded."""
    from aira_moe.tuner import layer as layer_module

    batches = random_batches(2, batch=2, length=16)
    ids = batches[0]["input_ids"]
    config = AiraMoeConfig(r=3, lora_alpha=6, num_A=2, num_B=3, target_modules="all-linear", use_awsvd_init=True,
                           awsvd_mode="residual", use_activation_aware=True, awsvd_collect_steps=2)
    model = get_peft_model(load(float_model_dir, "4bit"), config)
    model.calibrate(batches)
    params = [p for p in model.parameters() if p.requires_grad]

    def run():
        loss = model(ids, labels=ids).loss
        return (loss, *torch.autograd.grad(loss, params))

    unpadded = run()
    monkeypatch.setitem(layer_module.RANK_MULTIPLE, "cpu", 8)
    padded = run()
    for want, got in zip(unpadded, padded):  # fp32: the GEMMs' summation order changes with R
        assert got.shape == want.shape and ((got - want).norm() / want.norm()).item() < 1e-5
    widths = {module.r["default"] + module.aira_moe_init_A["default"].shape[0]
              for module in model.modules() if isinstance(module, layer_module.AiraMoeLayer)}
    assert widths == {6}, widths  # r + R0 = 6: padded to 8


@pytest.mark.parametrize("kind", QUANTIZATIONS)
@pytest.mark.parametrize("mode", ["residual", "directions"])
def test_every_technique_trains_on_a_quantised_base_and_reloads_identically(float_model_dir, tmp_path, kind, mode):
    batches = random_batches(4, batch=4, length=16)
    ids = batches[0]["input_ids"]
    with torch.no_grad():
        base_logits = load(float_model_dir, kind)(ids).logits
    model = get_peft_model(load(float_model_dir, kind), all_techniques(mode))
    model.calibrate(batches)
    model.train()
    weights_before = {name: p.detach().clone() for name, p in model.named_parameters() if p.dtype in (torch.uint8, torch.int8)}
    with torch.no_grad():
        start = model(ids).logits
    # step 0: the output is the quantised base's (the residual pair cancels inside the adapter; directions start at 0)
    assert ((start - base_logits).norm() / base_logits.norm()).item() <= 1e-4
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for batch in batches * 2:
        loss = model(batch["input_ids"], labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] - 0.3, losses
    # the quantised weights were never written
    for name, param in model.named_parameters():
        if name in weights_before:
            assert torch.equal(param, weights_before[name]), name
    with torch.no_grad():
        trained = model(ids).logits
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(load(float_model_dir, kind), tmp_path).train()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, trained)
    with pytest.raises(ValueError, match=f"cannot merge aira_moe into the {kind} quantised weight"):
        model.merge_and_unload()


def test_adapter_trained_on_4bit_exports_onto_the_unquantised_base(float_model_dir, tmp_path):
    """Merged into the float base, the adapter equals float base + adapter exactly; against the quantised base it
    trained on, the difference is the quantisation error of the base (measured here alongside)."""
    batches = random_batches(4, batch=4, length=16)
    ids = batches[1]["input_ids"]
    model = get_peft_model(load(float_model_dir, "4bit"), all_techniques("residual"))
    model.calibrate(batches)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for batch in batches:
        model(batch["input_ids"], labels=batch["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        on_quantised = model(ids).logits
        float_base = load(float_model_dir)
        quantisation_error = (float_base(ids).logits - load(float_model_dir, "4bit")(ids).logits).norm()
        on_float = PeftModel.from_pretrained(float_base, tmp_path / "adapter").train()
        unmerged = on_float(ids).logits
        merged = on_float.merge_and_unload()(ids).logits
    assert ((merged - unmerged).norm() / unmerged.norm()).item() < 1e-5
    # on the float base the adapter's output differs from the quantised run by about the base's quantisation error
    assert (merged - on_quantised).norm() < 1.5 * quantisation_error


@pytest.mark.slow
def test_llamafactory_cli_trains_4bit_with_every_technique_and_exports_onto_the_float_base(tmp_path):
    from test_llamafactory import export_lora_merged_logits, logged_losses, run_cli, train_args
    from transformers import AutoModelForCausalLM

    from aira_moe.tiny import build_tiny_assets

    assets = build_tiny_assets(str(tmp_path / "tiny"))
    out = tmp_path / "out"
    # train_args: every technique on; residual AwSVD, which on a quantised base runs inside the adapter
    args = train_args(assets, out, quantization_bit=4, double_quantization=True, awsvd_mode="residual", max_steps=6,
                      save_steps=6)
    run_cli("train", args, tmp_path)
    losses = logged_losses(out)
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses

    export_dir = tmp_path / "merged"
    run_cli("export", {"model_name_or_path": assets["model"], "adapter_name_or_path": str(out),
                       "finetuning_type": "aira_moe", "template": "default", "export_dir": str(export_dir),
                       "export_device": "cpu"}, tmp_path)
    ids = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32).eval()(ids).logits
        adapted = PeftModel.from_pretrained(load(assets["model"]), str(out)).eval()(ids).logits
    assert ((merged - adapted).norm() / adapted.norm()).item() <= 1e-4

    # the standard-LoRA export (multi-LoRA serving) accepts it too, against the unquantised base
    lora_merged = export_lora_merged_logits(out, tmp_path / "lora", lambda: load(assets["model"]), ids)
    assert ((lora_merged - merged).norm() / merged.norm()).item() <= 1e-4


@pytest.mark.parametrize("overrides, message", [
    ({"quantization_bit": 4, "quantization_method": "hqq"}, "`quantization_method`=hqq with `quantization_bit`=4"),
    ({"quantization_bit": 3, "quantization_method": "bnb"}, "`quantization_method`=bnb with `quantization_bit`=3"),
])
def test_unsupported_quantisation_is_refused_before_the_model_loads(tmp_path, overrides, message):
    from test_llamafactory import train_args

    from aira_moe.tiny import build_tiny_assets

    assets = build_tiny_assets(str(tmp_path / "tiny"))
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(train_args(assets, tmp_path / "out", **overrides)))
    result = subprocess.run(["aira-moe", "check", str(config)], capture_output=True, text=True)
    assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
