"""The 'routed' strategy: a per-token router over the (B_j, A_i) pairs, against references written out by hand."""

from collections import Counter
import os
import subprocess

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
from conftest import make_tiny_llama, random_batches
from peft import PeftModel, get_peft_model
from test_calibration import _free_port

from aira_moe import AiraMoeConfig
from aira_moe.export import to_lora_adapter
from aira_moe.tuner.collaboration import heuristic_pairing
from aira_moe.tuner.strategies import TokenDependentUpdateError

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def one_layer(strategy, top_k=0, coef=0.0, seed=0, **kwargs):
    """A routed (or fixed) aira_moe around one fp64 Linear(16 -> 12), r=3, 2x3 experts, random non-zero B."""
    torch.manual_seed(seed)
    config = AiraMoeConfig(r=3, lora_alpha=6, num_A=2, num_B=3, cola_strategy=strategy, target_modules=["0"],
                           init_weights=False, router_top_k=top_k, router_aux_loss_coef=coef, **kwargs)
    model = get_peft_model(nn.Sequential(nn.Linear(16, 12)).double(), config)
    return model, model.base_model.model[0]


def update_of(layer, x):
    return layer(x) - layer.base_layer(x)


@pytest.mark.parametrize("fixed", ["full", "heuristic"])
@pytest.mark.parametrize("training", [False, True])
def test_frozen_constant_router_equals_the_fixed_pairing(fixed, training):
    """Router weight 0 and bias log(M): the gates are M / sum(M) for every token, so the routed update is the fixed
    pairing's (same experts) divided by sum(M) -- outputs and expert gradients, fp64."""
    _, routed = one_layer("routed")
    _, reference = one_layer(fixed)
    pairing = torch.ones(3, 2, dtype=torch.float64) if fixed == "full" else heuristic_pairing(2, 3).double()
    with torch.no_grad():
        reference.aira_moe_A["default"].copy_(routed.aira_moe_A["default"])
        reference.aira_moe_B["default"].copy_(routed.aira_moe_B["default"])
        routed.aira_moe_router_weight["default"].zero_()
        routed.aira_moe_router_bias["default"].copy_(pairing.log().flatten())  # log 0 = -inf: gate exactly 0
    routed.aira_moe_router_weight["default"].requires_grad_(False)
    routed.aira_moe_router_bias["default"].requires_grad_(False)
    routed.train(training)
    reference.train(training)
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    got, want = update_of(routed, x), update_of(reference, x) / pairing.sum()
    assert ((got - want).norm() / want.norm()).item() <= 1e-10
    upstream = torch.randn_like(got)
    params = lambda layer: (layer.aira_moe_A["default"], layer.aira_moe_B["default"])  # noqa: E731
    for a, b in zip(torch.autograd.grad((got * upstream).sum(), params(routed)),
                    torch.autograd.grad((want * upstream).sum(), params(reference))):
        assert ((a - b).norm() / b.norm()).item() <= 1e-10


def reference_loop(layer, x, top_k, in_scale=None):
    """Per token: logits = W_r x + b (with ``router_input: projections`` W_r h / rms(h) + b, h = [A_1 x'; A_2 x'],
    x' = what the A side reads), p = softmax, keep the top_k (all when 0), y = s sum_e p_e B_j A_i x' (e = j num_A
    + i); and the load-balancing loss E sum_e f_e P_e. Written one token and one chosen expert at a time."""
    experts_A, experts_B = layer.aira_moe_A["default"], layer.aira_moe_B["default"]
    weight, bias = layer.aira_moe_router_weight["default"], layer.aira_moe_router_bias["default"]
    num_A, num_B = experts_A.shape[0], experts_B.shape[0]
    num_experts = num_A * num_B
    tokens = x.reshape(-1, x.shape[-1])
    outputs, probs, counts = [], [], torch.zeros(num_experts, dtype=x.dtype)
    reads_projections = layer.strategy_options["default"].get("router_input") == "projections"
    for token in tokens:
        seen = token if in_scale is None else token * in_scale
        if reads_projections:
            # where s goes with an input weight (folded into it) matters only through the RMS's epsilon
            h = torch.cat([a @ (seen if in_scale is None else seen * layer.scaling["default"]) for a in experts_A])
            p = torch.softmax(weight @ (h / torch.sqrt((h * h).mean() + 1e-6)) + bias, dim=0)
        else:
            p = torch.softmax(weight @ token + bias, dim=0)
        chosen = range(num_experts) if top_k == 0 else torch.topk(p, top_k).indices.tolist()
        dispatched = [int(torch.argmax(p))] if top_k == 0 else chosen
        for e in dispatched:
            counts[e] += 1
        out = torch.zeros(experts_B.shape[1], dtype=x.dtype)
        for e in chosen:
            j, i = divmod(int(e), num_A)
            out = out + p[e] * (experts_B[j] @ (experts_A[i] @ seen))
        outputs.append(layer.scaling["default"] * out)
        probs.append(p)
    fraction = counts / counts.sum()
    aux = num_experts * (fraction * torch.stack(probs).mean(0)).sum()
    return torch.stack(outputs).reshape(*x.shape[:-1], -1), aux


@pytest.mark.parametrize("top_k,router_input", [(1, "layer"), (2, "layer"), (0, "layer"), (1, "projections"),
                                                (0, "projections")])
def test_routing_equals_a_per_token_reference_loop_with_its_gradients(top_k, router_input):
    model, layer = one_layer("routed", top_k=top_k, coef=0.3, router_input=router_input)
    reads = 2 * 3 if router_input == "projections" else 16  # num_A * r, or in
    assert layer.aira_moe_router_weight["default"].shape == (6, reads)
    model.train()
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    got = model(x) - layer.base_layer(x)
    aux = model.base_model.routing_loss()
    want, want_aux = reference_loop(layer, x, top_k)
    assert ((got - want).norm() / want.norm()).item() <= 1e-10
    assert abs(aux.item() - 0.3 * want_aux.item()) <= 1e-12
    upstream = torch.randn_like(got)
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == 4  # A, B, router weight, router bias
    grads = torch.autograd.grad((got * upstream).sum() + aux, params)
    reference_grads = torch.autograd.grad((want * upstream).sum() + 0.3 * want_aux, params)
    for a, b in zip(grads, reference_grads):
        assert ((a - b).norm() / b.norm()).item() <= 1e-10
    # eval is deterministic and records nothing
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


@pytest.mark.parametrize("router_input", ["layer", "projections"])
def test_channel_weights_and_the_router_input(router_input):
    """inps weighting scales what the A side reads; the router reads the layer input itself, or the weighted
    projections."""
    model, layer = one_layer("routed", top_k=1, use_activation_aware=True, activation_aware_mode="inps",
                             calibrated=True, router_input=router_input)
    layer.set_channel_scale("default", torch.rand(16, dtype=torch.float64) + 0.5)
    x = torch.randn(4, 16, dtype=torch.float64)
    with torch.no_grad():
        want, _ = reference_loop(layer, x, 1, in_scale=layer.aira_moe_channel_scale["default"])
        got = update_of(layer.eval(), x)
    assert ((got - want).norm() / want.norm()).item() <= 1e-10


def test_merge_and_lora_export_refuse_in_one_line(tmp_path):
    model, layer = one_layer("routed")
    with pytest.raises(TokenDependentUpdateError) as merge_error:
        model.merge_and_unload()
    message = str(merge_error.value)
    assert "\n" not in message and "depends on the token" in message and "unmerged" in message
    assert torch.equal(layer.base_layer.weight, layer.get_base_layer().weight)  # nothing half-merged
    assert not layer.merged
    with pytest.raises(TokenDependentUpdateError, match="exported as a standard LoRA"):
        to_lora_adapter(model, str(tmp_path / "lora"))
    assert not (tmp_path / "lora").exists()
    model.save_pretrained(tmp_path / "adapter")
    result = subprocess.run(["aira-moe", "export-lora", "--adapter", str(tmp_path / "adapter"), "--out",
                             str(tmp_path / "lora")], capture_output=True, text=True, env={**os.environ})
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "depends on the token" in lines[0] and "llamafactory-cli chat" in lines[0]
    assert not (tmp_path / "lora").exists()


@pytest.mark.parametrize("kwargs,message", [
    (dict(router_top_k=7), r"`router_top_k` must be <= num_A \* num_B = 6 .*got 7"),
    (dict(router_top_k=-1), r"`router_top_k` must be an integer >= 0, got -1"),
    (dict(router_aux_loss_coef=-0.5), r"`router_aux_loss_coef` must be a number >= 0, got -0.5"),
    (dict(router_top_k=2, cola_strategy="full"), r"`router_top_k`=2 needs `cola_strategy`='routed'"),
    (dict(router_input="projections", cola_strategy="heuristic"),
     r"`router_input`='projections' needs `cola_strategy`='routed'.*got `cola_strategy`='heuristic'"),
    (dict(router_input="hidden"), r"router_input.*'hidden'"),
    (dict(router_top_k=2, use_awsvd_init=True, awsvd_mode="residual"), r"`awsvd_mode`='residual' .* `router_top_k`=2"),
])
def test_bad_router_values_name_key_and_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AiraMoeConfig(**{"num_A": 2, "num_B": 3, "cola_strategy": "routed", **kwargs})


def test_routed_update_needs_the_layer_input_to_route_on_it():
    """The functional form refuses a layer router without its input instead of silently routing on something else."""
    from aira_moe.tuner.strategies.routed import routed_update
    x, factor_A, factor_B = torch.randn(5, 16), torch.randn(4, 16), torch.randn(12, 6)  # num_A=2, num_B=3, r=2
    args = (x, factor_A, factor_B, torch.zeros(6, 4), torch.zeros(6), 2, 3, 0)
    with pytest.raises(ValueError, match=r"router_input='layer' with layer_input None"):
        routed_update(*args)
    update, probs, _ = routed_update(*args, router_input="projections")
    # zero router: uniform gates 1/6, so the update is sum_j sum_i B_j A_i x / 6
    want = summed_pairs(x, factor_A, factor_B) / 6
    torch.testing.assert_close(update, want)
    torch.testing.assert_close(probs, torch.full((5, 6), 1 / 6))


def summed_pairs(x, factor_A, factor_B):
    """sum over every (j, i) of B_j A_i x, factors in the routed layout (r=2, num_A=2, num_B=3)."""
    projections = [x @ factor_A[i * 2:(i + 1) * 2].T for i in range(2)]
    return sum(p @ factor_B[:, j * 2:(j + 1) * 2].T for j in range(3) for p in projections)


def routed_llama(**kwargs):
    config = AiraMoeConfig(r=4, lora_alpha=8, num_A=2, num_B=3, cola_strategy="routed", target_modules=ALL_TARGETS,
                           **kwargs)
    return get_peft_model(make_tiny_llama(), config)


def train_steps(model, input_ids, steps, optimizer=None):
    optimizer = optimizer or torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=input_ids, labels=input_ids).loss + model.base_model.routing_loss()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return optimizer


@pytest.mark.parametrize("router", [dict(router_top_k=2), dict(router_input="projections")])
def test_reload_and_resume_are_exact(input_ids, tmp_path, router):
    """3 steps, save the adapter and the optimizer, reload both into a fresh model, 3 more steps == 6 straight."""
    straight = routed_llama(**router)
    start = {k: v.clone() for k, v in straight.state_dict().items()}
    train_steps(straight, input_ids, 6)
    first = routed_llama(**router)
    first.load_state_dict(start)
    optimizer = train_steps(first, input_ids, 3)
    first.save_pretrained(tmp_path / "ckpt")
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    resumed = PeftModel.from_pretrained(make_tiny_llama(), tmp_path / "ckpt", is_trainable=True)
    resumed.eval()
    first.eval()
    with torch.no_grad():  # reload == before save
        assert torch.equal(resumed(input_ids).logits, first(input_ids).logits)
    optimizer = torch.optim.AdamW([p for p in resumed.parameters() if p.requires_grad], lr=1e-2)
    optimizer.load_state_dict(torch.load(tmp_path / "optimizer.pt"))
    train_steps(resumed, input_ids, 3, optimizer)
    for key, value in straight.state_dict().items():
        if "aira_moe_" in key:
            assert torch.equal(resumed.state_dict()[key], value), key


@pytest.mark.parametrize("strategy,router_input", [("routed", "layer"), ("routed", "projections"),
                                                   ("heuristic", "layer")])
def test_allocation_report_counts_every_trainable_parameter(strategy, router_input):
    """The report's trainable_params after layer-wise allocation is the model's count, a router's included (the
    projections router's grows with each layer's rank, the layer-input router's does not)."""
    config = AiraMoeConfig(r=4, lora_alpha=8, num_A=2, num_B=3, cola_strategy=strategy, router_input=router_input,
                           target_modules=ALL_TARGETS, use_layer_wise_rank=True, rank_budget=10, min_rank=1, max_rank=6)
    model = get_peft_model(make_tiny_llama(num_layers=3), config)
    report = model.calibrate(random_batches(2))
    assert len(set(model.peft_config["default"].rank_pattern.values())) > 1
    assert report["trainable_params"] == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_load_balancing_loss_reaches_the_router_through_non_reentrant_checkpointing(input_ids):
    """The loss is recorded inside checkpointed layers: non-reentrant checkpointing gives the router the gradients of
    a run without checkpointing; reentrant checkpointing (no autograd in its first pass) is refused, naming the fix."""
    grads = {}
    for mode in ("none", "non_reentrant", "reentrant"):
        model = routed_llama(router_top_k=1, router_aux_loss_coef=1.0, init_weights=False)
        if mode != "none":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": mode == "reentrant"})
            model.enable_input_require_grads()
        model.train()
        loss = model(input_ids=input_ids, labels=input_ids).loss
        if mode == "reentrant":
            with pytest.raises(RuntimeError, match="use_reentrant_gc: false"):
                model.base_model.routing_loss()
            continue
        (loss + model.base_model.routing_loss()).backward()
        grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters() if "router" in n}
    assert grads["none"] and grads["none"].keys() == grads["non_reentrant"].keys()
    for name, grad in grads["none"].items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(grads["non_reentrant"][name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_techniques_compose_and_the_residual_init_keeps_the_output(input_ids):
    """Layer-wise ranks, AwSVD ('residual': the A and B experts start at the activation-weighted top directions, the
    base weight holds the rest) and channel weighting on a routed adapter: output unchanged at step 0, then it
    trains; the routing statistics are logged."""
    model = make_tiny_llama(num_layers=3)
    reference = model(input_ids).logits.detach()
    config = AiraMoeConfig(r=4, num_A=2, num_B=3, cola_strategy="routed", target_modules=ALL_TARGETS,
                           use_layer_wise_rank=True, rank_budget=10, min_rank=1, max_rank=6,
                           objective_function="linear", use_awsvd_init=True, awsvd_mode="residual",
                           use_activation_aware=True, awsvd_collect_steps=2)
    peft_model = get_peft_model(model, config)
    peft_model.calibrate(random_batches(2))
    ranks = set(config.rank_pattern.values())
    assert len(ranks) > 1
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids).logits, reference, rtol=1e-4, atol=1e-4)
    losses = []
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    for _ in range(4):
        loss = peft_model(input_ids=input_ids, labels=input_ids).loss
        (loss + peft_model.base_model.routing_loss()).backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    summary = peft_model.base_model.routing_summary()
    assert set(summary) == {"router_aux_loss", "routing_entropy", "expert_load_min", "expert_load_max"}
    assert 1.0 <= summary["router_aux_loss"] <= 6.0 and 0 < summary["routing_entropy"] <= torch.log(torch.tensor(6.0))
    assert summary["expert_load_min"] <= 1.0 <= summary["expert_load_max"]
    assert peft_model.base_model.routing_summary() == {}  # reset after each read


# ----------------------------------------------------------------------------- two ranks


def _routed_worker(rank, world, port, out_dir):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(100 + rank)  # different RNG state per rank: the router's init would differ without the broadcast
    config = AiraMoeConfig(r=4, num_A=2, num_B=3, cola_strategy="routed", target_modules=ALL_TARGETS,
                           use_activation_aware=True, awsvd_collect_steps=2)
    peft_model = get_peft_model(make_tiny_llama(), config)
    peft_model.calibrate(random_batches(2, seed=10 + rank))
    state = {k: v.clone() for k, v in peft_model.state_dict().items() if "aira_moe_" in k}
    torch.save(state, os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()


def test_two_ranks_start_with_the_same_router(tmp_path):
    mp.start_processes(_routed_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    zero, one = torch.load(tmp_path / "0.pt"), torch.load(tmp_path / "1.pt")
    assert any("aira_moe_router_weight" in k for k in zero) and zero.keys() == one.keys()
    for key in zero:
        assert torch.equal(zero[key], one[key]), key


# ----------------------------------------------------------------------------- op count (see test_op_count.py)


def test_routed_step_is_a_fixed_number_of_ops_whatever_the_number_of_experts():
    """One forward + backward of the tiny bf16 Llama under autocast, 14 routed modules: per module the token-sized
    work is 3 GEMMs forward (router, A side, B side) and 1 batched gate mix, each with its backward -- pinned, and the
    same for 2x3 and 3x4 experts (no loop over experts). 44 kernels a module against LoRA's 18."""
    from test_op_count import RANK, TARGETS, count_step

    frozen = count_step(None)
    modules = 2 * len(TARGETS)
    per_module = Counter({"mm": 8, "bmm": 3, "addmm": 1, "_softmax": 1, "_softmax_backward_data": 1, "add": 3,
                          "_to_copy": 4, "mean": 2, "sum": 2, "topk": 1, "zeros_like": 1, "scatter_": 1, "xlogy": 1})
    for num_A, num_B in ((2, 3), (3, 4)):
        counter = count_step(AiraMoeConfig(r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS, num_A=num_A,
                                           num_B=num_B, cola_strategy="routed"))
        token_sized = counter.token_sized - frozen.token_sized
        assert token_sized == Counter({op: n * modules for op, n in per_module.items()}), (num_A, num_B, token_sized)
        assert sum((counter.kernels - frozen.kernels).values()) == 44 * modules


def test_llamafactory_seam_adds_the_routing_loss_with_its_micro_batch_share(input_ids):
    """The forward hook the seam puts on the PeftModel: training output loss + coef * aux, times this micro-batch's
    share of the accumulated batch's tokens when the Trainer passes ``num_items_in_batch``; eval untouched."""
    from aira_moe.integrations.routed_training import add_routing_loss_to_training_loss

    assert add_routing_loss_to_training_loss(get_peft_model(make_tiny_llama(), AiraMoeConfig(
        target_modules=ALL_TARGETS))) is None  # nothing for a fixed strategy
    model = routed_llama(router_top_k=1, router_aux_loss_coef=0.5, init_weights=False).train()
    labels = input_ids.clone()
    labels[:, :3] = -100  # 14 of 20 labels count
    plain = model(input_ids=input_ids, labels=labels).loss
    aux = model.base_model.routing_loss()
    assert aux.item() > 0
    handle = add_routing_loss_to_training_loss(model)
    torch.testing.assert_close(model(input_ids=input_ids, labels=labels).loss, plain + aux, rtol=0, atol=1e-6)
    # the Trainer's loss kwargs: the model then sums its token losses over num_items_in_batch (here 4 micro-batches)
    summed = model(input_ids=input_ids, labels=labels, num_items_in_batch=torch.tensor(56)).loss
    handle.remove()
    plain_summed = model(input_ids=input_ids, labels=labels, num_items_in_batch=torch.tensor(56)).loss
    torch.testing.assert_close(summed, plain_summed + aux * 14 / 56, rtol=0, atol=1e-6)
    model.eval()
    handle = add_routing_loss_to_training_loss(model)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=input_ids, labels=labels).loss, plain, rtol=0, atol=1e-6)
    handle.remove()


def test_a_routed_adapter_in_an_adapter_folder_is_found(tmp_path):
    """LLaMA-Factory's ``adapter_folder`` (a subfolder of every adapter path) is where the seam looks for a routed
    adapter, so export refuses it and inference keeps it unmerged as for one at the top level."""
    import json

    from aira_moe.adapter_paths import token_dependent_adapters

    for name, strategy in (("routed", "routed"), ("full", "full")):
        (tmp_path / name / "sub").mkdir(parents=True)
        (tmp_path / name / "sub" / "adapter_config.json").write_text(
            json.dumps({"peft_type": "AIRA_MOE", "cola_strategy": strategy}))
    paths = [str(tmp_path / "full"), str(tmp_path / "routed")]
    assert token_dependent_adapters(paths, "sub") == [str(tmp_path / "routed")]
    assert token_dependent_adapters(paths) == []  # no adapter_config.json at the top level


def test_aira_moe_eval_keeps_a_routed_adapter_unmerged_and_listed_last(tmp_path):
    """`aira-moe eval` (the recipes' evaluation block) merges fixed adapters as LLaMA-Factory does and keeps a routed
    one unmerged: its logits are those of peft's unmerged adapter over the merged fixed one; listed first, it is refused
    before any model loads."""
    from transformers import AutoModelForCausalLM

    from aira_moe.evaluation.runner import EvalArguments, load_model_and_tokenizer
    from aira_moe.tiny import build_tiny_assets

    assets = build_tiny_assets(str(tmp_path / "assets"), num_train=8, num_test=8)
    paths = {}
    for strategy in ("full", "routed"):
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(assets["model"]), AiraMoeConfig(
            r=2, num_A=2, num_B=3, cola_strategy=strategy, target_modules=["q_proj", "v_proj"], init_weights=False))
        paths[strategy] = str(tmp_path / strategy)
        model.save_pretrained(paths[strategy])
    args = EvalArguments(model_name_or_path=assets["model"], task="fineval", task_dir=assets["task_dir"],
                         adapter_name_or_path=f"{paths['full']},{paths['routed']}", finetuning_type="aira_moe",
                         device="cpu")
    args.validate()
    model, _, _ = load_model_and_tokenizer(args)
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(assets["model"]), paths["full"])
    reference = PeftModel.from_pretrained(reference.merge_and_unload(), paths["routed"]).eval()
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=0, atol=1e-5)
    assert isinstance(model, PeftModel)  # the routed adapter is there, unmerged
    args.adapter_name_or_path = f"{paths['routed']},{paths['full']}"
    with pytest.raises(ValueError, match=r"routed adapter, whose update depends on the token.*list it last"):
        args.validate()
