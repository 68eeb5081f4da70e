"""The AiraMoe peft tuner: collaboration math, init, merge, save/load, adapters, config validation."""

import dataclasses
import os
import json
import re
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
from conftest import make_tiny_llama
from peft import get_peft_model

from aira_moe import AiraMoeConfig
from aira_moe.tuner.collaboration import concat_padded, heuristic_pairing, random_pairings
from aira_moe.tuner.layer import AiraMoeLayer
from aira_moe.tuner.strategies import get_strategy

TARGETS = ["q_proj", "v_proj", "down_proj"]

# (name, config kwargs): the shared checks below run on every case
CASES = [
    ("full_1x1", dict(num_A=1, num_B=1, cola_strategy="full")),
    ("full_2x3", dict(num_A=2, num_B=3, cola_strategy="full")),
    ("heuristic_2x3", dict(num_A=2, num_B=3, cola_strategy="heuristic")),
    ("heuristic_3x2", dict(num_A=3, num_B=2, cola_strategy="heuristic")),
    ("random_2x3", dict(num_A=2, num_B=3, cola_strategy="random")),
    ("rslora_dropout", dict(num_A=2, num_B=2, use_rslora=True, lora_dropout=0.1)),
    ("rank_pattern", dict(num_A=2, num_B=3, rank_pattern={"model.layers.0.self_attn.q_proj": 2, "model.layers.1.mlp.down_proj": 7})),
]
CASE_IDS = [name for name, _ in CASES]


def wrap(model, init_weights=False, **kwargs):
    config = AiraMoeConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_weights=init_weights, **kwargs)
    return get_peft_model(model, config)


def explicit_pair_sum(experts_A, experts_B, pairing, scaling, x):
    """Reference: s * sum_j sum_i M[j, i] B_j A_i x, one pair at a time."""
    out = torch.zeros(*x.shape[:-1], experts_B.shape[1], dtype=x.dtype)
    for j in range(experts_B.shape[0]):
        for i in range(experts_A.shape[0]):
            out = out + pairing[j, i] * (x @ experts_A[i].T @ experts_B[j].T)
    return scaling * out


@pytest.mark.parametrize("strategy", ["full", "heuristic", "random"])
@pytest.mark.parametrize("training", [False, True])
def test_collapsed_forward_equals_explicit_pair_sum(strategy, training):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 12)).double()
    model = get_peft_model(base, AiraMoeConfig(r=3, num_A=2, num_B=5, cola_strategy=strategy, target_modules=["0"], init_weights=False))
    layer = model.base_model.model[0]
    layer.train(training)
    x = torch.randn(7, 16, dtype=torch.float64)
    experts_A, experts_B = layer.aira_moe_A["default"], layer.aira_moe_B["default"]
    if strategy == "full":
        pairing = torch.ones(5, 2, dtype=torch.float64)
    elif strategy == "heuristic":
        pairing = heuristic_pairing(2, 5).double()
    elif training:
        pairing = random_pairings(0, layer.step_counter.value, 1, 2, 5, "cpu")[layer.pairing_row].double()
    else:
        pairing = torch.full((5, 2), 1 / 5, dtype=torch.float64)
    with torch.no_grad():
        got = layer(x) - layer.base_layer(x)
        want = explicit_pair_sum(experts_A, experts_B, pairing, layer.scaling["default"], x)
    assert ((got - want).norm() / want.norm()).item() < 1e-10


def test_heuristic_pairing_by_hand():
    # k = 3 // 2 = 1: B0 -> A0, B1 -> A1, leftover B2 -> A(2 - 2) = A0
    assert heuristic_pairing(2, 3).tolist() == [[1, 0], [0, 1], [1, 0]]
    # k = 2: B0,B1 -> A0; B2,B3 -> A1; leftover B4 -> A0
    assert heuristic_pairing(2, 5).tolist() == [[1, 0], [1, 0], [0, 1], [0, 1], [1, 0]]
    # num_B < num_A: k = 0, every B is a leftover: Bj -> Aj
    assert heuristic_pairing(3, 2).tolist() == [[1, 0, 0], [0, 1, 0]]


@pytest.mark.parametrize("name,kwargs", CASES, ids=CASE_IDS)
def test_default_init_leaves_output_unchanged(name, kwargs, input_ids):
    model = make_tiny_llama()
    reference = model(input_ids).logits
    peft_model = wrap(model, init_weights=True, **kwargs).eval()
    assert torch.equal(peft_model(input_ids).logits, reference)


@pytest.mark.parametrize("name,kwargs", CASES, ids=CASE_IDS)
def test_merge_unmerge_and_unload(name, kwargs, input_ids):
    model = make_tiny_llama()
    base_weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    peft_model = wrap(model, **kwargs).eval()
    with torch.no_grad():
        unmerged = peft_model(input_ids).logits
        assert not torch.allclose(unmerged, make_tiny_llama()(input_ids).logits, atol=1e-4)  # adapter is non-zero
        peft_model.merge_adapter()
        merged = peft_model(input_ids).logits
        assert torch.allclose(merged, unmerged, atol=1e-5), (merged - unmerged).abs().max()
        peft_model.unmerge_adapter()
        for n, p in peft_model.base_model.model.named_parameters():
            key = n.replace(".base_layer", "")
            if key in base_weights:
                assert torch.allclose(p, base_weights[key], atol=1e-6), n
        merged_model = peft_model.merge_and_unload()
        assert not any(isinstance(m, AiraMoeLayer) for m in merged_model.modules())
        assert torch.allclose(merged_model(input_ids).logits, unmerged, atol=1e-5)


@pytest.mark.parametrize("name,kwargs", CASES, ids=CASE_IDS)
def test_trainable_parameter_count(name, kwargs):
    model = make_tiny_llama()
    peft_model = wrap(model, **kwargs)
    config = peft_model.peft_config["default"]
    expected = 0
    for module_name, module in peft_model.base_model.model.named_modules():
        if isinstance(module, AiraMoeLayer):
            rank = config.rank_pattern.get(module_name, config.r)
            expected += rank * (config.num_A * module.in_features + config.num_B * module.out_features)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert trainable == expected


def test_rank_pattern_shapes():
    peft_model = wrap(make_tiny_llama(), num_A=2, num_B=3, rank_pattern={"model.layers.0.self_attn.q_proj": 2})
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert tuple(layer.aira_moe_A["default"].shape) == (2, 2, 64)
    assert tuple(layer.aira_moe_B["default"].shape) == (3, 64, 2)
    other = peft_model.base_model.model.model.layers[1].self_attn.q_proj
    assert tuple(other.aira_moe_A["default"].shape) == (2, 4, 64)


def test_save_and_reload_in_fresh_process(tmp_path, input_ids):
    """Every case saved here reloads in one fresh process (nothing registered but by `import aira_moe`) to the same
    logits, exactly; one process for all cases, as each costs an interpreter start-up."""
    for name, kwargs in CASES:
        peft_model = wrap(make_tiny_llama(), **kwargs).eval()
        with torch.no_grad():
            for param in peft_model.parameters():
                if param.requires_grad:
                    param.add_(0.01 * torch.randn_like(param))
            expected = peft_model(input_ids).logits
        peft_model.save_pretrained(tmp_path / name)
        torch.save({"input_ids": input_ids, "expected": expected}, tmp_path / f"{name}.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.path.insert(0, {str(__file__.rsplit('/', 1)[0])!r})
        import aira_moe
        from conftest import make_tiny_llama
        from peft import PeftModel
        for name in {CASE_IDS!r}:
            data = torch.load({str(tmp_path)!r} + f"/{{name}}.pt")
            model = PeftModel.from_pretrained(make_tiny_llama(), {str(tmp_path)!r} + f"/{{name}}").eval()
            with torch.no_grad():
                got = model(data["input_ids"]).logits
            print("MAXDIFF", name, (got - data["expected"]).abs().max().item())
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    diffs = dict(re.findall(r"MAXDIFF (\S+) (\S+)", result.stdout))
    assert diffs == {name: "0.0" for name in CASE_IDS}, result.stdout


def test_training_step_reduces_loss(input_ids):
    torch.manual_seed(0)
    peft_model = wrap(make_tiny_llama(), init_weights=True, num_A=2, num_B=3)
    peft_model.train()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        loss = peft_model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses


def test_random_strategy_is_deterministic_in_eval_and_seeded_in_training(input_ids):
    model = wrap(make_tiny_llama(), num_A=3, num_B=4, cola_strategy="random", cola_seed=7)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, model(input_ids).logits)
    twin = wrap(make_tiny_llama(), num_A=3, num_B=4, cola_strategy="random", cola_seed=7)
    twin.load_state_dict(model.state_dict())
    model.train()
    twin.train()
    outputs = []
    with torch.no_grad():
        for _ in range(4):  # each training forward is a new step with a new pairing, the same for both copies
            a, b = model(input_ids).logits, twin(input_ids).logits
            assert torch.equal(a, b)
            outputs.append(a)
    assert any(not torch.equal(outputs[0], o) for o in outputs[1:])


def test_random_pairings_one_B_per_A_reproducible_per_step():
    table = random_pairings(7, 3, 5, 4, 6, "cpu")
    assert table.shape == (5, 6, 4) and table.dtype == torch.float32
    assert torch.equal(table.sum(1), torch.ones(5, 4))  # every A of every layer drives exactly one B
    assert torch.equal(table, random_pairings(7, 3, 5, 4, 6, "cpu"))
    assert not torch.equal(table, random_pairings(7, 4, 5, 4, 6, "cpu"))
    assert not torch.equal(table, random_pairings(8, 3, 5, 4, 6, "cpu"))
    # over many steps every B is drawn for every A (uniform over num_B), and layers differ from each other
    draws = torch.stack([random_pairings(0, step, 2, 2, 3, "cpu") for step in range(300)]).mean(0)
    assert ((draws - 1 / 3).abs() < 0.1).all(), draws
    assert not torch.equal(table[0], table[1])


def test_random_pairing_is_drawn_once_per_step_and_survives_checkpoint_recompute(input_ids):
    """Gradient checkpointing recomputes each layer's forward in backward: the recompute must see the step's pairing,
    so gradients equal those of a run without checkpointing (a different pairing would change them)."""
    grads = []
    for checkpointing in (False, True):
        model = wrap(make_tiny_llama(), num_A=2, num_B=3, cola_strategy="random", cola_seed=3)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        model.train()
        for _ in range(3):
            model.zero_grad()
            model(input_ids, labels=input_ids).loss.backward()
        counter = model.base_model.step_counter
        assert counter.value == 3 and len(counter._tables) == 1 and counter._tables[next(iter(counter._tables))][0] == 3
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("strategy", ["full", "heuristic", "random"])
@pytest.mark.parametrize("mode", ["inps", "outps"])
def test_folded_channel_scale_follows_every_change_of_the_buffer(strategy, mode):
    """The scale-times-channel-weights product is cached per compute dtype; replacing the weights, loading new ones in
    place and changing the scale must all show up in the output."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 12)).double()
    config = AiraMoeConfig(r=3, num_A=2, num_B=3, cola_strategy=strategy, target_modules=["0"], init_weights=False,
                           use_activation_aware=True, activation_aware_mode=mode, calibrated=True)
    model = get_peft_model(base, config)
    layer = model.base_model.model[0]
    x = torch.randn(5, 16, dtype=torch.float64)

    def expected():
        scale = layer.aira_moe_channel_scale["default"].double()
        ones = torch.ones(3, 2, dtype=torch.float64)
        pairing = {"full": ones, "heuristic": heuristic_pairing(2, 3).double(), "random": ones / 3}
        experts_A = layer.aira_moe_A["default"] * scale if mode == "inps" else layer.aira_moe_A["default"]
        got = explicit_pair_sum(experts_A, layer.aira_moe_B["default"], pairing[strategy], layer.scaling["default"], x)
        return got * scale if mode == "outps" else got

    layer.eval()
    with torch.no_grad():
        for change in ("none", "replaced", "in_place", "scaling"):
            if change == "replaced":
                layer.set_channel_scale("default", torch.rand_like(layer.aira_moe_channel_scale["default"]) + 0.5)
            elif change == "in_place":
                layer.aira_moe_channel_scale["default"].mul_(3.0)
            elif change == "scaling":
                layer.scaling["default"] *= 0.5
            got = layer(x) - layer.base_layer(x)
            torch.testing.assert_close(got, expected(), rtol=1e-10, atol=1e-12, msg=change)


@pytest.mark.parametrize("strategy", ["full", "heuristic", "random"])
def test_rank_padding_for_tensor_cores_changes_neither_update_nor_gradients(strategy):
    """On CUDA the inner dimension is padded to a multiple of 8 with zeros: the same update and the same gradients."""
    torch.manual_seed(0)
    experts_A = torch.randn(2, 3, 16, dtype=torch.float64, requires_grad=True)
    experts_B = torch.randn(3, 12, 3, dtype=torch.float64, requires_grad=True)
    pairing = heuristic_pairing(2, 3).double() if strategy == "heuristic" else (
        random_pairings(0, 1, 1, 2, 3, "cpu")[0].double() if strategy == "random" else None)
    x, in_scale = torch.randn(5, 16, dtype=torch.float64), torch.rand(16, dtype=torch.float64)
    results = []
    for multiple in (1, 8):
        factor_A, factor_B = get_strategy(strategy).fold(experts_A, experts_B, scaling=1.5, pairing=pairing,
                                                         in_scale=in_scale)
        factor_A, factor_B = concat_padded([factor_A], [factor_B], multiple)
        assert factor_A.shape[0] == factor_B.shape[1] and factor_A.shape[0] % multiple == 0
        out = x @ factor_A.T @ factor_B.T
        grads = torch.autograd.grad(out.square().sum(), (experts_A, experts_B))
        results.append((out, *grads))
    assert results[0][0].shape == results[1][0].shape
    for unpadded, padded in zip(*results):
        torch.testing.assert_close(padded, unpadded, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("strategy", ["full", "heuristic", "random"])
def test_padded_layer_forward_and_gradients_equal_unpadded(strategy, monkeypatch):
    """The layer pads as it does on CUDA (forced on CPU): same output and gradients; the cached zero blocks stay zero."""
    from aira_moe.tuner import layer as layer_module

    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(16, 12)).double(), AiraMoeConfig(
        r=3, num_A=2, num_B=3, cola_strategy=strategy, target_modules=["0"], init_weights=False))
    layer = model.base_model.model[0].train()
    x = torch.randn(5, 16, dtype=torch.float64)
    params = (layer.aira_moe_A["default"], layer.aira_moe_B["default"])

    def run():
        layer.step_counter.value = 7  # the same 'random' pairing in both runs
        out = layer(x)
        return (out, *torch.autograd.grad(out.square().sum(), params))

    unpadded = run()
    monkeypatch.setitem(layer_module.RANK_MULTIPLE, "cpu", 8)
    padded = run()
    for want, got in zip(unpadded, padded):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert layer._zeros_cache and all(not zeros.any() for zeros in layer._zeros_cache.values())


def test_multiple_adapters_switch_disable_delete(input_ids):
    model = make_tiny_llama()
    reference = model(input_ids).logits.detach()
    peft_model = wrap(model, num_A=2, num_B=2)
    peft_model.add_adapter("second", AiraMoeConfig(r=2, target_modules=TARGETS, init_weights=False, num_A=1, num_B=3))
    peft_model.eval()
    with torch.no_grad():
        first = peft_model(input_ids).logits
        peft_model.set_adapter("second")
        second = peft_model(input_ids).logits
        assert not torch.allclose(first, second)
        layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
        assert layer.aira_moe_A["second"].requires_grad and not layer.aira_moe_A["default"].requires_grad
        with peft_model.disable_adapter():
            assert torch.allclose(peft_model(input_ids).logits, reference, atol=1e-6)
        peft_model.delete_adapter("default")
        assert "default" not in layer.aira_moe_A
        assert torch.allclose(peft_model(input_ids).logits, second, atol=1e-6)


def test_config_json_round_trip(tmp_path):
    config = AiraMoeConfig(r=6, num_A=2, num_B=3, cola_strategy="heuristic", rank_pattern={"a.b": 3}, rank_budget="auto",
                           use_awsvd_init=True, target_modules=["q_proj"])
    config.save_pretrained(tmp_path)
    loaded = AiraMoeConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "AIRA_MOE"


def test_every_field_has_help_without_glued_sentences():
    for field in dataclasses.fields(AiraMoeConfig):
        if field.name in {f.name for f in dataclasses.fields(AiraMoeConfig.__mro__[1])}:
            continue  # PeftConfig's own fields
        text = field.metadata.get("help", "")
        assert text.strip(), field.name
        assert not re.search(r"[a-z]\.[A-Z]", text), (field.name, text)


@pytest.mark.parametrize(
    "kwargs,key",
    [
        (dict(num_A=0), "num_A"),
        (dict(num_B=0), "num_B"),
        (dict(r=0), "`r`"),
        (dict(cola_strategy="nested"), "cola_strategy"),
        (dict(theta_type="grad"), "theta_type"),
        (dict(objective_function="sqrt"), "objective_function"),
        (dict(activation_aware_mode="both"), "activation_aware_mode"),
        (dict(min_rank=8, max_rank=4), "min_rank"),
        (dict(lod_threshold_M=0), "lod_threshold_M"),
        (dict(rank_budget="lots"), "rank_budget"),
    ],
)
def test_bad_config_names_the_field(kwargs, key):
    with pytest.raises(ValueError, match=re.escape(key)):
        AiraMoeConfig(**kwargs)


def test_non_linear_target_is_refused():
    with pytest.raises(ValueError, match="embed_tokens.*Embedding"):
        get_peft_model(make_tiny_llama(), AiraMoeConfig(target_modules=["embed_tokens"]))


def test_prefix_is_unique_among_peft_methods():
    from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING
    from peft.utils.peft_types import PeftType

    ours = PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.AIRA_MOE]
    assert ours == "aira_moe_"
    for peft_type, prefix in PEFT_TYPE_TO_PREFIX_MAPPING.items():
        if peft_type != PeftType.AIRA_MOE:
            assert prefix not in ours and ours not in prefix, prefix


def test_registration_is_idempotent():
    from aira_moe.tuner import _register
    from aira_moe.tuner._registry import ensure_peft_type

    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils.peft_types import PeftType

    for _ in range(2):  # a second registration would make peft raise "already registered"
        _register()
        ensure_peft_type()
    assert PeftType._member_names_.count("AIRA_MOE") == 1 and list(PeftType).count(PeftType.AIRA_MOE) == 1
    assert PeftType("AIRA_MOE") is PeftType.AIRA_MOE is ensure_peft_type()
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.AIRA_MOE].__name__ == "AiraMoeModel"


class _TokenGemmCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts matrix products whose operand has one row per token: the work that grows with the batch."""

    GEMMS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}

    def __init__(self, tokens):
        super().__init__()
        self.tokens, self.count = tokens, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.GEMMS and any(isinstance(a, torch.Tensor) and self.tokens in a.shape[:-1] for a in args):
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("strategy", ["full", "heuristic", "random"])
def test_forward_has_no_python_loop_over_pairs(strategy):
    """The experts are folded in weight space: the token-sized GEMMs are the base layer's one plus the adapter's
    two, whatever num_A and num_B (a loop over pairs would run num_A * num_B or more)."""
    x = torch.randn(2, 7, 64)
    counts = {}
    for num_A, num_B in ((1, 1), (4, 6)):
        layer = wrap(make_tiny_llama(), num_A=num_A, num_B=num_B, cola_strategy=strategy).base_model.model.model.layers[0].self_attn.q_proj
        layer.train()
        with _TokenGemmCounter(tokens=14) as counter:
            layer(x)
        counts[(num_A, num_B)] = counter.count
    assert counts == {(1, 1): 3, (4, 6): 3}, counts


def test_unsupported_peft_breaks_only_aira_moe():
    """The start-up hook on a peft outside the tested range (faked by narrowing the table before import): peft and
    LoRA work, nothing is registered, and `import aira_moe` fails naming both versions."""
    script = textwrap.dedent(
        """
        import warnings
        import aira_moe_startup
        aira_moe_startup.SUPPORTED["peft"] = ("0.0.1", "0.0.2")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import peft
        assert "aira_moe" not in __import__("sys").modules
        assert any("aira_moe is not registered" in str(w.message) for w in caught)
        import torch
        model = peft.get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), peft.LoraConfig(r=2, target_modules=["0"]))
        assert model(torch.ones(1, 4)).shape == (1, 4)
        try:
            import aira_moe
        except ImportError as error:
            print("REFUSED", error)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "AIRA_MOE_DISABLE_STARTUP"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"REFUSED aira_moe supports peft >= 0.0.1, < 0.0.2; the installed peft is {peft_version()}." in result.stdout


def peft_version():
    import peft

    return peft.__version__


def test_startup_hook_registers_with_plain_peft_import(tmp_path, input_ids):
    """lm-evaluation-harness and other peft users never import aira_moe: the installed .pth hook registers it when
    peft is imported."""
    model = wrap(make_tiny_llama(), num_A=2, num_B=3).eval()
    model.save_pretrained(tmp_path / "adapter")
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(__file__.rsplit('/', 1)[0])!r})
        from peft import PeftModel
        from conftest import make_tiny_llama
        assert "aira_moe" in sys.modules
        model = PeftModel.from_pretrained(make_tiny_llama(), {str(tmp_path / 'adapter')!r})
        print("TYPE", type(model.base_model).__name__)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "AIRA_MOE_DISABLE_STARTUP"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "TYPE AiraMoeModel" in result.stdout
