"""Calibration statistics, importance, allocation, AwSVD and weighting: hand-computed references and equivalences."""

import itertools
import os
import random
import re
import socket

import pytest
import torch
import torch.multiprocessing as mp
from conftest import make_tiny_llama, random_batches
from peft import PeftModel, get_peft_model

from aira_moe import AiraMoeConfig
from aira_moe.calibration.allocation import allocate_ranks, check_budget, objective_value
from aira_moe.calibration.awsvd import awsvd_directions, awsvd_factors, guarded_scale, randomized_svd
from aira_moe.tuner.calibrate import allocation_units
from aira_moe.calibration.stats import (
    ChannelStats,
    activation_importance,
    channel_scores,
    input_channel_norms,
    input_rms,
    lod_score,
    minmax_normalize,
    normalize_channel_scores,
    update_stats,
)

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ----------------------------------------------------------------------------- statistics and formulas


def test_stats_and_formulas_by_hand():
    x = torch.tensor([[[1.0, -2.0], [3.0, 0.0], [9.0, 9.0]]])  # (1, 3, 2); the last token is padding
    mask = torch.tensor([[1, 1, 0]])
    stats = ChannelStats.zeros(2, 2)
    w_x = torch.tensor([[[2.0, -1.0], [-4.0, 0.5], [7.0, 7.0]]])
    update_stats(stats, x, mask, w_x)
    assert stats.count.item() == 2
    assert stats.sum_sq.tolist() == [10.0, 4.0]
    assert stats.sum_abs.tolist() == [4.0, 2.0]
    assert stats.sum_abs_out.tolist() == [6.0, 1.5]
    assert torch.allclose(input_channel_norms(stats), torch.tensor([10.0**0.5, 2.0]))
    assert torch.allclose(input_rms(stats), torch.tensor([5.0**0.5, 2.0**0.5]))
    assert activation_importance(stats) == pytest.approx((2.0 + 1.0) / 2)
    assert torch.allclose(channel_scores(stats, "outps", normalize="none"), torch.tensor([3.0, 0.75]))
    # inps scores (2, 1): min-max -> (1, 0); by the mean 1.5 -> (4/3, 2/3)
    assert torch.allclose(channel_scores(stats, "inps", normalize="minmax"), torch.tensor([1.0, 0.0]), atol=1e-7)
    assert torch.allclose(channel_scores(stats, "inps", normalize="mean"), torch.tensor([4 / 3, 2 / 3]))


def test_lod_by_hand():
    weight = torch.tensor([[1.0, -4.0], [0.5, 2.0]])
    norms = torch.tensor([2.0, 1.0])
    # A = |W| * a = [[2, 4], [1, 2]], mean 2.25; M = 1.5 -> threshold 3.375 -> one entry (4) above: 1/4
    assert lod_score(weight, norms, 1.5, reference="mean") == pytest.approx(0.25)
    # M = 0.5 -> threshold 1.125 -> entries 2, 4, 2 above: 3/4
    assert lod_score(weight, norms, 0.5, reference="mean") == pytest.approx(0.75)
    # the function's default reference is the config's (median 2: M = 0.9 -> threshold 1.8 -> 3/4, the mean gives 1/4)
    assert AiraMoeConfig().lod_reference == "median"
    assert lod_score(weight, norms, 0.9) == lod_score(weight, norms, 0.9, reference="median") == pytest.approx(0.75)


def test_lod_median_reference_by_hand():
    # A = [[2, 4], [1, 2]]: median 2 (torch takes the lower middle of 1, 2, 2, 4); M = 1.5 -> threshold 3 -> 1/4
    weight, norms = torch.tensor([[1.0, -4.0], [0.5, 2.0]]), torch.tensor([2.0, 1.0])
    assert lod_score(weight, norms, 1.5, reference="median") == pytest.approx(0.25)
    # M = 0.9 -> threshold 1.8 -> 2, 4, 2 above: 3/4 (the mean-based threshold 2.025 would give 1/4)
    assert lod_score(weight, norms, 0.9, reference="median") == pytest.approx(0.75)
    assert lod_score(weight, norms, 0.9, reference="mean") == pytest.approx(0.25)
    # one huge channel inflates the mean, not the median: with a_2 = 100, A = [[2, 400], [1, 200]]
    big = torch.tensor([2.0, 100.0])
    assert lod_score(weight, big, 1.5, reference="mean") == pytest.approx(0.25)  # mean 150.75: only 400 above 226
    assert lod_score(weight, big, 1.5, reference="median") == pytest.approx(0.5)  # median 2: 400 and 200 above 3
    with pytest.raises(ValueError, match="lod_reference"):
        lod_score(weight, norms, 1.5, reference="max")


def test_minmax_normalize_by_hand():
    scores = torch.tensor([2.0, 4.0, 3.0])
    assert torch.allclose(minmax_normalize(scores, eps=0.0), torch.tensor([0.0, 1.0, 0.5]))


def test_channel_normalizers_by_hand():
    scores = torch.tensor([1.0, 4.0, 16.0, 3.0])  # mean 6; sqrt (1, 2, 4, sqrt 3)
    root_mean = (7.0 + 3.0**0.5) / 4
    expected = {
        "minmax": torch.tensor([0.0, 3 / 15, 1.0, 2 / 15]),
        "mean": torch.tensor([1 / 6, 4 / 6, 16 / 6, 3 / 6]),
        "sqrt": torch.tensor([1.0, 2.0, 4.0, 3.0**0.5]) / root_mean,
        "none": scores,
    }
    inverse = torch.tensor([1.0, 1 / 4, 1 / 16, 1 / 3])
    expected["inverse"] = inverse / inverse.mean()
    for method, reference in expected.items():
        assert torch.allclose(normalize_channel_scores(scores, method), reference, atol=1e-6), method
    for method in ("mean", "sqrt", "inverse"):  # the average scale of the update is kept
        assert normalize_channel_scores(scores, method).mean().item() == pytest.approx(1.0)
    # a dead channel cannot blow up 'inverse': its score is floored at 1e-3 * mean = 1e-3, so 1/1e-3 vs 1/2
    dead = normalize_channel_scores(torch.tensor([0.0, 2.0]), "inverse")
    assert torch.isfinite(dead).all() and dead[0] / dead[1] == pytest.approx(2 / 1e-3)
    with pytest.raises(ValueError, match="activation_normalize"):
        normalize_channel_scores(scores, "softmax")
    with pytest.raises(ValueError, match="every channel score is zero"):
        normalize_channel_scores(torch.zeros(3), "mean")


def test_padding_does_not_change_statistics():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    padded = x.clone()
    padded[0, 3:] = 1e3  # whatever sits on padded positions must not count
    a, b = ChannelStats.zeros(3, 3), ChannelStats.zeros(3, 3)
    update_stats(a, x, mask, x)
    update_stats(b, padded, mask, padded)
    for left, right in zip(a.tensors(), b.tensors()):
        assert torch.equal(left, right)
    # and equals the statistics of the real tokens alone
    real = torch.cat([x[0, :3], x[1]])
    assert torch.allclose(a.sum_sq, real.square().sum(0))


def test_calibration_pass_ignores_padding_in_model():
    """Same real tokens, different padding lengths in the batch: identical statistics."""

    def stats_for(pad):
        model = get_peft_model(make_tiny_llama(), AiraMoeConfig(target_modules=["q_proj"], use_activation_aware=True))
        ids = torch.tensor([[5, 6, 7, 8] + [0] * pad, [9, 10, 11, 12] + [0] * pad])
        mask = torch.tensor([[1, 1, 1, 1] + [0] * pad] * 2)
        from aira_moe.tuner.calibrate import collect_for_model

        return collect_for_model(model.base_model, [{"input_ids": ids, "attention_mask": mask}], "default", max_batches=1)

    short, long = stats_for(0), stats_for(5)
    for name in short:
        assert torch.allclose(short[name].sum_sq, long[name].sum_sq, rtol=1e-5)
        assert short[name].count == long[name].count == 8


# ----------------------------------------------------------------------------- allocation


def brute_force(theta, budget, lo, hi, objective):
    best, best_value = None, -float("inf")
    for ranks in itertools.product(range(lo, hi + 1), repeat=len(theta)):
        if sum(ranks) == budget:
            value = objective_value(theta, list(ranks), objective)
            if value > best_value + 1e-12:
                best, best_value = list(ranks), value
    return best, best_value


@pytest.mark.parametrize("objective", ["log", "linear", "exp2", "cubic"])
def test_allocator_matches_brute_force(objective):
    rng = random.Random(objective)
    for _ in range(60):
        layers = rng.randint(2, 4)
        lo = rng.randint(1, 3)
        hi = rng.randint(lo, lo + 5)
        budget = rng.randint(layers * lo, layers * hi)
        theta = [rng.uniform(0.01, 1.0) for _ in range(layers)]
        ranks = allocate_ranks(theta, budget, lo, hi, objective)
        _, best_value = brute_force(theta, budget, lo, hi, objective)
        assert sum(ranks) == budget and all(lo <= r <= hi for r in ranks)
        assert objective_value(theta, ranks, objective) == pytest.approx(best_value, rel=1e-9)


def test_allocator_is_not_uniform_when_optimum_is_not():
    # convex objective: the optimum puts everything on the most important layer
    assert allocate_ranks([0.1, 0.9, 0.2], 12, 2, 8, "cubic") == [2, 8, 2]
    assert allocate_ranks([1.0, 1.0], 8, 1, 16, "log") == [4, 4]


@pytest.mark.parametrize(
    "args,pattern",
    [
        ((3, 2, 2, 4), r"`rank_budget`=3 .*2 layers.*`min_rank`=2.*\[4, 8\]"),
        ((100, 2, 2, 4), r"`rank_budget`=100"),
        ((8, 2, 5, 4), r"`min_rank` \(5\) must be <= `max_rank` \(4\)"),
        ((8, 2, 0, 4), r"`min_rank` must be >= 1"),
    ],
)
def test_infeasible_budget_errors(args, pattern):
    with pytest.raises(ValueError, match=pattern):
        check_budget(*args)


def test_all_zero_importance_is_an_error():
    with pytest.raises(ValueError, match="zero for every layer"):
        allocate_ranks([0.0, 0.0], 4, 1, 4, "log")


def test_allocation_units_group_by_decoder_layer():
    names = ["model.layers.10.mlp.up_proj", "model.layers.2.self_attn.q_proj", "model.layers.2.mlp.down_proj", "lm_head"]
    units = allocation_units(names)
    assert list(units) == ["model.layers.2", "model.layers.10", "lm_head"]
    assert units["model.layers.2"] == ["model.layers.2.self_attn.q_proj", "model.layers.2.mlp.down_proj"]


def test_budget_is_checked_before_any_forward_pass():
    model = get_peft_model(make_tiny_llama(), AiraMoeConfig(target_modules=["q_proj"], use_layer_wise_rank=True,
                                                            rank_budget=3, min_rank=2, max_rank=4))

    class Exploding:
        def __iter__(self):
            raise AssertionError("the loader must not be touched")

    with pytest.raises(ValueError, match="`rank_budget`=3"):
        model.calibrate(Exploding())


# ----------------------------------------------------------------------------- AwSVD


def test_awsvd_factors_follow_the_formula():
    torch.manual_seed(0)
    weight, rms = torch.randn(6, 5, dtype=torch.float64), torch.rand(5, dtype=torch.float64) + 0.5
    factor_A, factor_B = awsvd_factors(weight.float(), rms.float(), 2, solver="full")
    scaled = weight * rms  # W S
    u, s, vh = torch.linalg.svd(scaled, full_matrices=False)
    # signs of singular vectors are arbitrary: compare the products
    want = (u[:, :2] * s[:2]) @ (vh[:2] / rms)
    assert torch.allclose((factor_B @ factor_A).double(), want, atol=1e-5)
    assert torch.allclose((factor_A.double() * rms) @ (factor_A.double() * rms).T, torch.eye(2, dtype=torch.float64), atol=1e-5)
    # the weighted error is the Eckart-Young optimum: sqrt(sum of the tail singular values squared)
    err = ((weight - (factor_B @ factor_A).double()) * rms).norm()
    assert err.item() == pytest.approx(s[2:].square().sum().sqrt().item(), rel=1e-5)


def test_symmetric_split_gives_the_same_product():
    torch.manual_seed(1)
    weight, rms = torch.randn(8, 6), torch.rand(6) + 0.5
    a1, b1 = awsvd_factors(weight, rms, 3, solver="full", split="reference")
    a2, b2 = awsvd_factors(weight, rms, 3, solver="full", split="symmetric")
    assert torch.allclose(b1 @ a1, b2 @ a2, atol=1e-5)


def test_randomized_svd_agrees_with_full_svd():
    torch.manual_seed(2)
    # decaying spectrum, like trained weights
    u, _ = torch.linalg.qr(torch.randn(200, 120))
    v, _ = torch.linalg.qr(torch.randn(150, 120))
    spectrum = torch.logspace(0, -3, 120)
    matrix = (u * spectrum) @ v.T
    rank = 16
    ur, sr, vr = randomized_svd(matrix, rank, niter=4, oversample=16, generator=torch.Generator().manual_seed(0))
    uf, sf, vhf = torch.linalg.svd(matrix, full_matrices=False)
    err_random = (matrix - (ur * sr) @ vr.T).norm()
    err_full = (matrix - (uf[:, :rank] * sf[:rank]) @ vhf[:rank]).norm()
    assert err_random <= err_full * (1 + 1e-3)
    assert torch.allclose(sr, sf[:rank], rtol=1e-3)


def test_zero_activation_channels_are_clamped():
    rms = torch.tensor([1.0, 0.0, 2.0])
    scale = guarded_scale(rms)
    assert scale[1].item() == pytest.approx(1e-3)
    factor_A, factor_B = awsvd_factors(torch.randn(4, 3), rms, 2)
    assert torch.isfinite(factor_A).all() and factor_A.abs().max() < 1e4
    with pytest.raises(ValueError, match="zero activation RMS"):
        guarded_scale(torch.zeros(3))


# ----------------------------------------------------------------------------- the techniques on a model

TECHNIQUES = dict(
    r=4, num_A=2, num_B=3, target_modules=ALL_TARGETS, use_layer_wise_rank=True, rank_budget=10, min_rank=1, max_rank=6,
    objective_function="linear", use_awsvd_init=True, use_activation_aware=True, awsvd_collect_steps=3,
    awsvd_mode="residual",  # the mode that edits the base weight: merge / reload / unload must undo it exactly
)


@pytest.mark.parametrize("strategy", ["full", "heuristic", "random"])
@pytest.mark.parametrize("mode", ["inps", "outps"])
def test_all_techniques_step0_merge_reload(strategy, mode, tmp_path, input_ids):
    model = make_tiny_llama(num_layers=3)
    reference = model(input_ids).logits.detach()
    config = AiraMoeConfig(**TECHNIQUES, cola_strategy=strategy, activation_aware_mode=mode)
    peft_model = get_peft_model(model, config)
    report = peft_model.calibrate(random_batches(3), report_dir=str(tmp_path / "report"))
    ranks = sorted(set(peft_model.peft_config["default"].rank_pattern.values()))
    assert len(ranks) > 1 and report["rank_sum"] == 10
    assert (tmp_path / "report" / "aira_moe_allocation.json").is_file()
    assert (tmp_path / "report" / "aira_moe_allocation.png").is_file()
    peft_model.eval()
    with torch.no_grad():
        step0 = peft_model(input_ids).logits
        assert ((step0 - reference).norm() / reference.norm()).item() <= 1e-5
        # the AwSVD update is not zero: the base weight really holds W - dW0
        layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
        assert layer.get_delta_weight("default").abs().max() > 1e-3
        for param in peft_model.parameters():
            if param.requires_grad:
                param.add_(0.02 * torch.randn_like(param))
        trained = peft_model(input_ids).logits
        with peft_model.disable_adapter():
            assert torch.allclose(peft_model(input_ids).logits, reference, atol=1e-5)
        peft_model.merge_adapter()
        # fp32 rounding of W + dW, relative to how far the update moved the logits (~1 here; float64 is exact)
        moved = (trained - reference).abs().max()
        assert (peft_model(input_ids).logits - trained).abs().max() <= 1e-4 * moved
        peft_model.unmerge_adapter()
    peft_model.save_pretrained(tmp_path / "adapter")
    # reload onto a fresh copy of the ORIGINAL base weights
    reloaded = PeftModel.from_pretrained(make_tiny_llama(num_layers=3), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids).logits, trained, atol=1e-6)
        merged = reloaded.merge_and_unload()
        assert (merged(input_ids).logits - trained).abs().max() <= 1e-4 * moved
    # unloading without merging restores the original model
    restored = PeftModel.from_pretrained(make_tiny_llama(num_layers=3), tmp_path / "adapter").unload()
    with torch.no_grad():
        assert torch.allclose(restored(input_ids).logits, reference, atol=1e-5)


@pytest.mark.parametrize("strategy", ["full", "heuristic", "random"])
@pytest.mark.parametrize("awsvd_mode", ["residual", "directions"])
def test_low_cpu_mem_usage_reload_is_identical(strategy, awsvd_mode, tmp_path, input_ids):
    """peft builds the adapter on the meta device and assigns the saved tensors: every buffer (channel weights,
    initial factors, pairing) must arrive, and the residual subtraction must happen once."""
    config = AiraMoeConfig(**{**TECHNIQUES, "awsvd_mode": awsvd_mode}, cola_strategy=strategy)
    peft_model = get_peft_model(make_tiny_llama(num_layers=3), config)
    peft_model.calibrate(random_batches(3))
    with torch.no_grad():
        for param in peft_model.parameters():
            if param.requires_grad:
                param.add_(0.02 * torch.randn_like(param))
    peft_model.save_pretrained(tmp_path)
    with torch.no_grad():
        trained = peft_model.eval()(input_ids).logits
        plain = PeftModel.from_pretrained(make_tiny_llama(num_layers=3), tmp_path).eval()
        lazy = PeftModel.from_pretrained(make_tiny_llama(num_layers=3), tmp_path, low_cpu_mem_usage=True).eval()
        assert not any(t.is_meta for t in list(lazy.parameters()) + list(lazy.buffers()))
        assert torch.allclose(lazy(input_ids).logits, plain(input_ids).logits, atol=1e-6)
        assert torch.allclose(lazy(input_ids).logits, trained, atol=1e-5)


def test_loading_twice_does_not_subtract_twice(tmp_path, input_ids):
    peft_model = get_peft_model(make_tiny_llama(), AiraMoeConfig(**{**TECHNIQUES, "rank_budget": 6}))
    peft_model.calibrate(random_batches(2))
    peft_model.save_pretrained(tmp_path)
    peft_model.eval()
    with torch.no_grad():
        before = peft_model(input_ids).logits
        peft_model.load_adapter(str(tmp_path), adapter_name="default")
        assert torch.allclose(peft_model(input_ids).logits, before, atol=1e-6)


def test_bf16_base_model_calibrates_in_fp32(input_ids):
    model = make_tiny_llama(dtype=torch.bfloat16)
    peft_model = get_peft_model(model, AiraMoeConfig(**{**TECHNIQUES, "rank_budget": 6}))
    peft_model.calibrate(random_batches(2))
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.aira_moe_init_A["default"].dtype == torch.float32
    assert layer.aira_moe_channel_scale["default"].dtype == torch.float32
    assert torch.isfinite(peft_model(input_ids).logits.float()).all()


def test_reference_api_importance_optimize_apply():
    peft_model = get_peft_model(make_tiny_llama(num_layers=3), AiraMoeConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                              rank_budget=9, min_rank=1, max_rank=6))
    importance = peft_model.compute_layer_importance(random_batches(4), max_samples=8)
    assert list(importance) == ["model.layers.0", "model.layers.1", "model.layers.2"]
    allocation = peft_model.optimize_layer_ranks(importance, objective_function="cubic")
    assert sum(allocation.values()) == 9
    pattern = peft_model.apply_layer_wise_ranks(allocation)
    layer = peft_model.base_model.model.model.layers[0].self_attn.v_proj
    assert layer.aira_moe_A["default"].shape[1] == allocation["model.layers.0"] == pattern["model.layers.0.self_attn.v_proj"]


def test_calibrating_twice_is_refused():
    peft_model = get_peft_model(make_tiny_llama(), AiraMoeConfig(**{**TECHNIQUES, "rank_budget": 6}))
    peft_model.calibrate(random_batches(1))
    with pytest.raises(ValueError, match="already calibrated"):
        peft_model.calibrate(random_batches(1))


# ----------------------------------------------------------------------------- distributed agreement


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _distributed_worker(rank, world, port, out_dir):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(100 + rank)  # different RNG state per rank: LoRA-style init would differ without the broadcast
    model = make_tiny_llama(num_layers=3)
    peft_model = get_peft_model(model, AiraMoeConfig(**TECHNIQUES))
    # each rank sees different data
    peft_model.calibrate(random_batches(3, seed=10 + rank))
    state = {k: v.clone() for k, v in peft_model.state_dict().items() if "aira_moe_" in k or "base_layer" in k}
    torch.save({"state": state, "pattern": peft_model.peft_config["default"].rank_pattern}, os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()


def test_two_ranks_end_with_identical_ranks_and_weights(tmp_path):
    mp.start_processes(_distributed_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    zero, one = torch.load(tmp_path / "0.pt"), torch.load(tmp_path / "1.pt")
    assert zero["pattern"] == one["pattern"] and len(set(zero["pattern"].values())) > 1
    assert zero["state"].keys() == one["state"].keys()
    for key in zero["state"]:
        assert torch.equal(zero["state"][key], one["state"][key]), key
    # and the statistics were really pooled: a single-process run on rank 0's data alone gives other weights
    alone = get_peft_model(make_tiny_llama(num_layers=3), AiraMoeConfig(**TECHNIQUES))
    alone.calibrate(random_batches(3, seed=10))
    key = next(k for k in zero["state"] if re.search(r"aira_moe_init_A", k))
    assert not torch.equal(alone.state_dict()[key], zero["state"][key])


# ----------------------------------------------------------------------------- AwSVD 'directions' and layer scaling


def test_awsvd_directions_follow_the_formula():
    torch.manual_seed(3)
    weight, rms = torch.randn(7, 5, dtype=torch.float64), torch.rand(5, dtype=torch.float64) + 0.5
    rows = awsvd_directions(weight.float(), rms.float(), 3, solver="full").double()
    _, _, vh = torch.linalg.svd(weight * rms, full_matrices=False)  # W S = U' S' V'^T
    level = (rms.square().median() / 3).sqrt()
    want = level * vh[:3] / rms  # c V'^T S^-1
    for got, ref in zip(rows, want):  # singular vectors have arbitrary signs
        assert torch.allclose(got, ref, atol=1e-5) or torch.allclose(got, -ref, atol=1e-5)
    # each row reads the whitened input along one unit direction, at LoRA's activation-space scale
    assert torch.allclose((rows * rms).norm(dim=1), level.expand(3), rtol=1e-5)


def test_directions_init_starts_at_zero_update_with_distinct_experts(input_ids, tmp_path):
    model = make_tiny_llama()
    reference = model(input_ids).logits.detach()
    config = AiraMoeConfig(r=3, num_A=2, num_B=3, cola_strategy="heuristic", target_modules=ALL_TARGETS,
                           use_awsvd_init=True, awsvd_mode="directions", awsvd_solver="full", awsvd_collect_steps=2)
    peft_model = get_peft_model(model, config)
    base_weight = peft_model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.detach().clone()
    batches = random_batches(2)
    peft_model.calibrate(batches)
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert torch.equal(layer.base_layer.weight, base_weight)  # the base weight is untouched
    assert "default" not in layer.aira_moe_init_A  # nothing to ship besides A and B
    experts = layer.aira_moe_A["default"]  # (2, 3, 64): the top 6 directions, 3 per expert
    assert not torch.allclose(experts[0], experts[1])
    from aira_moe.tuner.calibrate import collect_for_model

    stats = collect_for_model(get_peft_model(make_tiny_llama(), AiraMoeConfig(target_modules=["q_proj"])).base_model,
                              batches, "default", max_batches=2)
    rms = input_rms(stats["model.layers.0.self_attn.q_proj"])
    want = awsvd_directions(base_weight, rms, 6, solver="full")
    for got, ref in zip(experts.detach().reshape(6, -1), want):
        assert torch.allclose(got, ref, atol=1e-4) or torch.allclose(got, -ref, atol=1e-4)
    peft_model.eval()
    with torch.no_grad():
        assert torch.equal(peft_model(input_ids).logits, reference)
        for param in peft_model.parameters():
            if param.requires_grad:
                param.add_(0.02 * torch.randn_like(param))
        trained = peft_model(input_ids).logits
    peft_model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(make_tiny_llama(), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids).logits, trained)


@pytest.mark.parametrize("layer_scaling", ["rank", "base"])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_layer_scaling_after_allocation(layer_scaling, use_rslora, tmp_path):
    config = AiraMoeConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_layer_wise_rank=True, rank_budget=10,
                           min_rank=2, max_rank=8, objective_function="cubic", layer_scaling=layer_scaling,
                           use_rslora=use_rslora)
    peft_model = get_peft_model(make_tiny_llama(num_layers=3), config)
    peft_model.calibrate(random_batches(2))
    root = (lambda r: r**0.5) if use_rslora else (lambda r: r)
    scales = {}
    for name, layer in peft_model.base_model.aira_moe_layers().items():
        r_l = layer.r["default"]
        expected = 8 / root(4) if layer_scaling == "base" else 8 / root(r_l)
        assert layer.scaling["default"] == pytest.approx(expected)
        scales[name] = layer.scaling["default"]
    assert sorted(peft_model.peft_config["default"].rank_pattern.values()) == [2, 2, 6]
    peft_model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(make_tiny_llama(num_layers=3), tmp_path)
    assert {n: l.scaling["default"] for n, l in reloaded.base_model.aira_moe_layers().items()} == scales
