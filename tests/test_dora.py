"""``use_dora``: a trained magnitude per output channel over the folded update, y = m / ||W + dW|| * (W + dW) x (+ bias),
the norm a constant for autograd (DoRA). Hand references in fp64, 1x1 'full' against peft's own DoRA, merge / reload /
export equivalences, and the refusals."""

import copy
import json
from types import SimpleNamespace

import pytest
import torch
from conftest import SINGLE_TECHNIQUES, make_tiny_llama, random_batches
from peft import LoraConfig, PeftModel, get_peft_model

from aira_moe import AiraMoeConfig
from aira_moe.errors import UserError
from aira_moe.export import export_lora, to_lora_adapter
from aira_moe.integrations.arguments import METHOD_KEYS, peft_config_from_args

FORMS = {"heuristic": dict(num_A=2, num_B=3), "full": dict(num_A=2, num_B=2), "random": dict(num_A=2, num_B=3)}
TECHNIQUES = {"plain": {}, **SINGLE_TECHNIQUES}


class TwoLinear(torch.nn.Module):
    """One projection with a bias (DoRA rescales W x, not the bias) and one without."""

    def __init__(self):
        super().__init__()
        self.q = torch.nn.Linear(16, 12, bias=True)
        self.v = torch.nn.Linear(12, 16, bias=False)

    def forward(self, x=None, input_ids=None, attention_mask=None):  # the calibration pass calls model(input_ids=...)
        return self.v(torch.relu(self.q(x if x is not None else input_ids)))


def dora_model(base, strategy, seed=0, **extra):
    torch.manual_seed(seed)
    config = AiraMoeConfig(r=2, lora_alpha=4, cola_strategy=strategy, target_modules=["q", "v"], use_dora=True,
                           **FORMS[strategy], **extra)
    return get_peft_model(copy.deepcopy(base), config)


def move_every_trainable(model, seed=1, size=0.1):
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(size * torch.randn_like(param))


def reference_linear(layer, x):
    """By hand from the saved tensors: (W + dW) rows rescaled to the magnitudes; dW = s B_cat (M kron I) A_cat with
    the channel weights, built here from the experts (not from the layer's fold)."""
    experts_A, experts_B = layer.aira_moe_A["default"], layer.aira_moe_B["default"]
    num_A, num_B = experts_A.shape[0], experts_B.shape[0]
    strategy = layer.strategy["default"].name
    if strategy == "full":
        pairing = torch.ones(num_B, num_A, dtype=x.dtype)
    elif strategy == "heuristic":  # B_j bound to A_(j mod num_A)
        pairing = torch.zeros(num_B, num_A, dtype=x.dtype)
        for j in range(num_B):
            pairing[j, j % num_A] = 1
    else:  # 'random' in eval: the expected pairing, each A with each B with probability 1 / num_B
        pairing = torch.full((num_B, num_A), 1.0 / num_B, dtype=x.dtype)
    delta = sum(pairing[j, i] * experts_B[j] @ experts_A[i] for j in range(num_B) for i in range(num_A))
    delta = layer.scaling["default"] * delta
    mode = layer.activation_mode.get("default")
    if mode == "inps":
        delta = delta * layer.aira_moe_channel_scale["default"].to(x.dtype)[None, :]
    elif mode == "outps":
        delta = delta * layer.aira_moe_channel_scale["default"].to(x.dtype)[:, None]
    adapted = layer.base_layer.weight + delta
    scale = layer.aira_moe_magnitude["default"] / torch.linalg.vector_norm(adapted, dim=1).detach()
    out = x @ (scale[:, None] * adapted).T
    return out if layer.base_layer.bias is None else out + layer.base_layer.bias


def reference_output(model, x):
    inner = model.base_model.model
    return reference_linear(inner.v, torch.relu(reference_linear(inner.q, x)))


# every strategy plain, and the recipes' strategy with each technique
CASES = [(strategy, "plain") for strategy in FORMS] + [("heuristic", technique) for technique in TECHNIQUES if technique != "plain"]


@pytest.mark.parametrize(("strategy", "technique"), CASES)
def test_output_is_the_rescaled_adapted_weight_and_starts_at_the_base(strategy, technique):
    torch.manual_seed(0)
    base = TwoLinear().double()
    x = torch.randn(5, 16, dtype=torch.float64)
    model = dora_model(base, strategy, awsvd_collect_steps=1, **TECHNIQUES[technique])
    if model.peft_config["default"].needs_calibration:
        model.calibrate([{"input_ids": torch.randn(2, 4, 16, dtype=torch.float64), "attention_mask": torch.ones(2, 4)}])
    model.eval()
    # every init keeps the base output: B = 0, or (residual) the base weight lost dW0 and the magnitude was reset; the
    # residual shift W - dW0 is written in fp32 (also without use_dora), hence the tolerance there
    torch.testing.assert_close(model(x), base(x), rtol=0, atol=1e-6 if technique == "awsvd_residual" else 1e-12)
    for layer in (model.base_model.model.q, model.base_model.model.v):
        if technique.startswith("weighting"):
            layer.set_channel_scale("default", torch.rand(layer.aira_moe_channel_scale["default"].shape) + 0.5)
    move_every_trainable(model)
    torch.testing.assert_close(model(x), reference_output(model, x), rtol=0, atol=1e-12)


def test_the_norm_is_a_constant_for_the_gradient():
    """Gradients of A, B and the magnitude equal autograd's through the hand reference with the norm detached."""
    torch.manual_seed(0)
    base = TwoLinear().double()
    x = torch.randn(5, 16, dtype=torch.float64)
    model = dora_model(base, "heuristic")
    move_every_trainable(model)
    model.train()
    model(x).pow(2).sum().backward()
    got = {name: param.grad.clone() for name, param in model.named_parameters() if param.requires_grad}
    model.zero_grad()
    reference_output(model, x).pow(2).sum().backward()
    assert set(got) == {f"base_model.model.{m}.aira_moe_{p}.default" for m in "qv" for p in ("A", "B", "magnitude")}
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(got[name], param.grad, rtol=0, atol=1e-12)


def test_one_by_one_full_is_peft_dora():
    """1x1 'full' with use_dora is peft's DoRA: the same A, B and magnitude give the same output and gradients."""
    torch.manual_seed(0)
    base = TwoLinear().double()
    x = torch.randn(5, 16, dtype=torch.float64)
    ours = get_peft_model(copy.deepcopy(base), AiraMoeConfig(r=3, lora_alpha=6, target_modules=["q", "v"], use_dora=True))
    peers = get_peft_model(copy.deepcopy(base), LoraConfig(r=3, lora_alpha=6, target_modules=["q", "v"], use_dora=True))
    move_every_trainable(ours)
    with torch.no_grad():
        for module in "qv":
            layer, peer = getattr(ours.base_model.model, module), getattr(peers.base_model.model, module)
            peer.lora_A["default"].weight.copy_(layer.aira_moe_A["default"][0])
            peer.lora_B["default"].weight.copy_(layer.aira_moe_B["default"][0])
            peer.lora_magnitude_vector["default"].weight.copy_(layer.aira_moe_magnitude["default"])
    for model in (ours, peers):
        model.train()
        model(x).pow(2).sum().backward()
    torch.testing.assert_close(ours(x), peers(x), rtol=0, atol=1e-12)
    for module in "qv":
        layer, peer = getattr(ours.base_model.model, module), getattr(peers.base_model.model, module)
        torch.testing.assert_close(layer.aira_moe_A["default"].grad[0], peer.lora_A["default"].weight.grad, rtol=0, atol=1e-10)
        torch.testing.assert_close(layer.aira_moe_B["default"].grad[0], peer.lora_B["default"].weight.grad, rtol=0, atol=1e-10)
        torch.testing.assert_close(layer.aira_moe_magnitude["default"].grad,
                                   peer.lora_magnitude_vector["default"].weight.grad, rtol=0, atol=1e-10)


@pytest.mark.parametrize("strategy", list(FORMS))
def test_merged_unmerged_reloaded_and_exported_agree(strategy, tmp_path):
    torch.manual_seed(0)
    base = TwoLinear().double()
    x = torch.randn(5, 16, dtype=torch.float64)
    model = dora_model(base, strategy, use_activation_aware=True, activation_aware_mode="inps")
    move_every_trainable(model)
    model.eval()
    expected = model(x)
    model.merge_adapter()
    torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-12)
    model.unmerge_adapter()
    torch.testing.assert_close(model.base_model.model.q.base_layer.weight, base.q.weight, rtol=0, atol=1e-12)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-12)

    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter").eval()
    torch.testing.assert_close(reloaded(x), expected, rtol=0, atol=0)

    # as a peft DoRA adapter: from the live model and from the saved directory
    for out, report in (("live", to_lora_adapter(model, str(tmp_path / "live"))),
                        ("saved", export_lora(str(tmp_path / "adapter"), str(tmp_path / "saved")))):
        assert report["use_dora"] is True
        assert json.loads((tmp_path / out / "adapter_config.json").read_text())["use_dora"] is True
        exported = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / out).eval()
        torch.testing.assert_close(exported(x), expected, rtol=0, atol=1e-12)
    merged = model.merge_and_unload()
    torch.testing.assert_close(merged(x), expected, rtol=0, atol=1e-12)


def test_dora_on_a_llama_calibrated_with_every_technique_reloads_with_the_same_shapes(tmp_path, input_ids):
    """Layer-wise ranks re-create the adapters: every module keeps one magnitude of its out_features, and the saved
    adapter reloads to the same logits."""
    torch.manual_seed(0)
    config = AiraMoeConfig(r=3, lora_alpha=6, num_A=2, num_B=3, cola_strategy="heuristic", use_dora=True,
                           target_modules=["q_proj", "v_proj", "down_proj"], awsvd_collect_steps=2,
                           use_layer_wise_rank=True, rank_budget=7, min_rank=1, max_rank=6,
                           use_awsvd_init=True, awsvd_mode="residual", use_activation_aware=True)
    model = get_peft_model(make_tiny_llama(num_layers=2), config)
    with torch.no_grad():
        before = model(input_ids).logits
    model.calibrate(random_batches(2))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, before, rtol=0, atol=1e-4)
    for name, module in model.named_modules():
        if hasattr(module, "aira_moe_magnitude"):
            assert module.aira_moe_magnitude["default"].shape == (module.out_features,), name
    move_every_trainable(model, size=0.02)
    model.eval()
    with torch.no_grad():
        expected = model(input_ids).logits
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(make_tiny_llama(num_layers=2), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids).logits, expected, rtol=0, atol=0)


def test_refusals_name_the_key():
    with pytest.raises(UserError, match=r"`use_dora`=True needs a fixed pairing .*'routed'"):
        AiraMoeConfig(r=2, num_A=2, num_B=3, cola_strategy="routed", use_dora=True)


def test_llamafactory_use_dora_reaches_the_config():
    """LLaMA-Factory's own ``use_dora`` key keeps its meaning under finetuning_type aira_moe."""
    defaults = AiraMoeConfig()
    args = SimpleNamespace(lora_rank=4, lora_alpha=8, lora_dropout=0.0, lora_target=["all"], additional_target=None,
                           use_rslora=False, **{name: getattr(defaults, name) for name in METHOD_KEYS})
    for use_dora in (False, True):
        args.use_dora = use_dora
        assert peft_config_from_args(args).use_dora is use_dora


def test_llamafactory_parse_accepts_use_dora_and_refuses_what_it_cannot_do(tmp_path):
    """Through the parser `llamafactory-cli train` and `aira-moe check` share, before any weight is loaded."""
    pytest.importorskip("llamafactory")
    import os

    import yaml

    from aira_moe.integrations.llamafactory import check_train_config
    from aira_moe.tiny import tiny_llama_config

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(repo, "configs", "math.yaml"), encoding="utf-8") as handle:
        args = yaml.safe_load(handle)
    tiny_llama_config(400).save_pretrained(tmp_path / "model")  # config.json only: no weights to load
    args.update(model_name_or_path=str(tmp_path / "model"), rank_budget="auto", output_dir=str(tmp_path / "out"),
                bf16=False, dataset_dir=os.path.join(repo, "data"), use_dora=True)
    assert check_train_config(args).startswith("finetuning_type aira_moe")
    with pytest.raises(UserError, match=r"^`use_dora` with `quantization_bit`=4: .*drop one of the two\.$"):
        check_train_config({**args, "quantization_bit": 4})
    with pytest.raises(UserError, match=r"^`use_dora`=True needs a fixed pairing"):
        check_train_config({**args, "cola_strategy": "routed"})
    with pytest.raises(UserError, match=r"^`pissa_init` and `loraplus_lr_ratio` are LoRA-only"):
        check_train_config({**args, "pissa_init": True})


def test_bf16_base_starts_at_the_base_output_and_keeps_small_magnitude_steps():
    """The magnitude is fp32 on a bf16 base, and s - 1 is formed before the cast: at init the output is the base's
    exactly, and a 0.3 % magnitude step (below bf16's resolution of s near 1) still moves it."""
    torch.manual_seed(0)
    base = TwoLinear().to(torch.bfloat16)
    x = torch.randn(5, 16).to(torch.bfloat16)
    model = dora_model(base, "heuristic").eval()
    layer = model.base_model.model.q
    assert layer.aira_moe_magnitude["default"].dtype == torch.float32
    with torch.no_grad():
        expected = base(x)
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
        layer.aira_moe_magnitude["default"].mul_(1.003)
        assert not torch.equal(model(x), expected)


def test_an_adapter_without_use_dora_beside_one_with_it():
    """Adding (or re-creating) an adapter without the magnitude on a layer that has one for another adapter."""
    torch.manual_seed(0)
    base = TwoLinear().double()
    x = torch.randn(5, 16, dtype=torch.float64)
    model = dora_model(base, "heuristic")
    model.add_adapter("plain", AiraMoeConfig(r=2, num_A=2, num_B=3, cola_strategy="heuristic", target_modules=["q", "v"]))
    layer = model.base_model.model.q
    assert layer._has_magnitude("default") and not layer._has_magnitude("plain")
    layer.update_layer("default", **{**model.peft_config["default"].layer_kwargs("q"), "use_dora": False})
    assert not layer._has_magnitude("default")
    model.set_adapter("plain")
    torch.testing.assert_close(model.eval()(x), base(x), rtol=0, atol=1e-12)
