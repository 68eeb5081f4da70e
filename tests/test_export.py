"""Export to a standard LoRA adapter: exact against the aira_moe adapter, loadable by stock peft without aira_moe,
in the format vLLM's LoRA loader reads; bad input refused."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import SINGLE_TECHNIQUES, make_tiny_llama, random_batches
from peft import PeftModel, get_peft_model

from aira_moe import AiraMoeConfig
from aira_moe.cli import main as cli_main
from aira_moe.export import export_lora, to_lora_adapter
from aira_moe.export.lora import reduce_rank

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TECHNIQUE_CASES = {
    "none": {},
    **SINGLE_TECHNIQUES,
    "layer_wise": dict(use_layer_wise_rank=True, rank_budget=7, min_rank=1, max_rank=6, objective_function="cubic"),
    "all": dict(use_layer_wise_rank=True, rank_budget=7, min_rank=1, max_rank=6, objective_function="cubic",
                use_awsvd_init=True, awsvd_mode="residual", use_activation_aware=True, activation_aware_mode="inps"),
}
# what vLLM's LoRA loader reads (vllm/lora/peft_helper.py, PEFTHelper): required r, lora_alpha, target_modules;
# modules_to_save must be None and use_dora False; scale lora_alpha / r (or / sqrt(r) with use_rslora)
VLLM_REQUIRED = {"r", "lora_alpha", "target_modules"}


def trained_adapter(strategy, technique, tmp_path, seed=0):
    torch.manual_seed(seed)
    config = AiraMoeConfig(r=3, lora_alpha=6, num_A=2, num_B=3, cola_strategy=strategy, target_modules=TARGETS,
                           awsvd_collect_steps=2, **TECHNIQUE_CASES[technique])
    model = get_peft_model(make_tiny_llama(num_layers=2), config)
    if config.needs_calibration:
        model.calibrate(random_batches(2))
    with torch.no_grad():  # a "trained" adapter: every trainable tensor moved
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
    return model.eval()


def test_exported_lora_equals_aira_moe_in_stock_peft_without_aira_moe(tmp_path, input_ids):
    """Every strategy x technique: base + exported LoRA, loaded by stock peft in a process where aira_moe is never
    imported, gives the logits of base + the aira_moe adapter."""
    base_dir = tmp_path / "base"
    make_tiny_llama(num_layers=2).save_pretrained(base_dir)
    expected, exported = {}, {}
    for strategy in ("full", "heuristic", "random"):
        for technique in TECHNIQUE_CASES:
            case = f"{strategy}-{technique}"
            model = trained_adapter(strategy, technique, tmp_path)
            with torch.no_grad():
                expected[case] = model(input_ids).logits
            model.save_pretrained(tmp_path / "aira" / case)
            report = export_lora(str(tmp_path / "aira" / case), str(tmp_path / "lora" / case))
            exported[case] = report
            if technique == "none":  # exact rank: full / random (eval) r, heuristic num_A * r
                assert report["r"] == (6 if strategy == "heuristic" else 3), case
            if technique == "awsvd_residual":  # plus the frozen initial pair
                assert report["r"] == (9 if strategy == "heuristic" else 6), case
    torch.save(input_ids, tmp_path / "ids.pt")
    script = f"""
import sys, torch
from peft import PeftModel
from transformers import LlamaForCausalLM
ids = torch.load({str(tmp_path / "ids.pt")!r})
out = {{}}
for case in {sorted(expected)!r}:
    base = LlamaForCausalLM.from_pretrained({str(base_dir)!r}).eval()
    model = PeftModel.from_pretrained(base, {str(tmp_path / "lora")!r} + "/" + case).eval()
    with torch.no_grad():
        out[case] = model(ids).logits
torch.save(out, {str(tmp_path / "lora_logits.pt")!r})
assert not any(name == "aira_moe" or name.startswith("aira_moe.") for name in sys.modules), "aira_moe was imported"
print("AIRA_MOE_IMPORTED", "aira_moe" in sys.modules)
"""
    env = {**os.environ, "AIRA_MOE_DISABLE_STARTUP": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "AIRA_MOE_IMPORTED False" in result.stdout
    got = torch.load(tmp_path / "lora_logits.pt")
    for case, reference in expected.items():
        error = ((got[case] - reference).norm() / reference.norm()).item()
        assert error <= 1e-4, (case, error)


def test_exported_config_is_what_vllm_reads(tmp_path):
    model = trained_adapter("heuristic", "all", tmp_path)
    model.save_pretrained(tmp_path / "aira")
    export_lora(str(tmp_path / "aira"), str(tmp_path / "lora"), dtype="bf16")
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert VLLM_REQUIRED <= set(config) and isinstance(config["r"], int) and config["lora_alpha"] == config["r"]
    assert config["modules_to_save"] is None and config["use_dora"] is False and config["use_rslora"] is False
    assert "rank_pattern" not in config and "alpha_pattern" not in config
    assert not [key for key in config if "aira" in key or key in ("num_A", "num_B", "cola_strategy")]
    assert config["target_modules"] == sorted(TARGETS)
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    assert len(tensors) == 2 * 7 * 2
    for key, tensor in tensors.items():
        assert key.startswith("base_model.model.") and key.endswith((".lora_A.weight", ".lora_B.weight")), key
        assert key.split(".")[-3] in config["target_modules"]
        assert tensor.dtype == torch.bfloat16
        dim = 0 if key.endswith("lora_A.weight") else 1
        assert tensor.shape[dim] == config["r"]  # one rank for every module (zero-padded)


def test_live_model_export_matches_file_export(tmp_path, input_ids):
    model = trained_adapter("random", "all", tmp_path)
    model.save_pretrained(tmp_path / "aira")
    from_file = export_lora(str(tmp_path / "aira"), str(tmp_path / "a"))
    from_model = to_lora_adapter(model, str(tmp_path / "b"))
    assert from_file["r"] == from_model["r"]
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "a" / "adapter_model.safetensors"), load_file(tmp_path / "b" / "adapter_model.safetensors")
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key


def test_reduce_rank_is_exact_and_truncation_reports_its_error():
    torch.manual_seed(0)
    left, right = torch.randn(20, 3, dtype=torch.float64), torch.randn(3, 16, dtype=torch.float64)
    # rank 3 written with 7 columns (duplicated and zero directions): reduced to 3, same product
    factor_B = torch.cat([left, left[:, :2], torch.zeros(20, 2, dtype=torch.float64)], dim=1)  # (20, 7)
    factor_A = torch.cat([right, right[:2], torch.randn(2, 16, dtype=torch.float64)], dim=0)  # (7, 16)
    reduced = reduce_rank(factor_A, factor_B)
    assert reduced.rank_needed == 3 and reduced.A.shape == (3, 16) and reduced.relative_error < 1e-12
    assert torch.allclose(reduced.B @ reduced.A, factor_B @ factor_A, atol=1e-10)
    with pytest.raises(ValueError, match=r"layer\.x needs rank 3 .*`max_rank`=2"):
        reduce_rank(factor_A, factor_B, max_rank=2, name="layer.x")
    cut = reduce_rank(factor_A, factor_B, max_rank=2, truncate=True)
    product = factor_B @ factor_A
    singular = torch.linalg.svdvals(product)
    assert cut.A.shape == (2, 16)
    assert cut.relative_error == pytest.approx((singular[2] / singular.norm()).item(), rel=1e-6)
    assert ((product - cut.B @ cut.A).norm() / product.norm()).item() == pytest.approx(cut.relative_error, rel=1e-6)


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    assert cli_main(["export-lora", "--adapter", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "no adapter at" in capsys.readouterr().err
    from peft import LoraConfig

    lora = get_peft_model(make_tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path / "lora")
    assert cli_main(["export-lora", "--adapter", str(tmp_path / "lora"), "--out", str(tmp_path / "o")]) == 2
    assert "LORA adapter, not an aira_moe" in capsys.readouterr().err
    model = trained_adapter("heuristic", "none", tmp_path)
    model.save_pretrained(tmp_path / "aira")
    existing = tmp_path / "taken"
    existing.mkdir()
    (existing / "keep.txt").write_text("x")
    assert cli_main(["export-lora", "--adapter", str(tmp_path / "aira"), "--out", str(existing)]) == 2
    assert "--overwrite" in capsys.readouterr().err and (existing / "keep.txt").read_text() == "x"
    # heuristic 2x3 r=3 needs rank 6: refused at 4, truncated with the error printed
    assert cli_main(["export-lora", "--adapter", str(tmp_path / "aira"), "--out", str(tmp_path / "o4"), "--max_rank", "4"]) == 2
    error = capsys.readouterr().err
    assert "needs 6" in error and "`--max_rank 6`" in error and not (tmp_path / "o4").exists()
    assert cli_main(["export-lora", "--adapter", str(tmp_path / "aira"), "--out", str(tmp_path / "o4"), "--max_rank", "4",
                     "--truncate"]) == 0
    out = capsys.readouterr().out
    assert "r=4" in out and "relative error" in out
    assert cli_main(["export-lora", "--adapter", str(tmp_path / "aira"), "--out", str(existing), "--overwrite"]) == 0


def test_too_small_max_rank_names_the_one_max_rank_that_fits_every_module(tmp_path, capsys):
    """Modules need different ranks (layer-wise ranks + a residual init): the error names the largest, once, and that
    number then exports every module exactly."""
    model = trained_adapter("full", "all", tmp_path)
    model.save_pretrained(tmp_path / "aira")
    needed = export_lora(str(tmp_path / "aira"), str(tmp_path / "free"))["rank_needed"]
    largest, smallest = max(needed.values()), min(needed.values())
    assert smallest < largest  # the case this test is about
    too_small = largest - 1
    over = sum(rank > too_small for rank in needed.values())
    args = ["export-lora", "--adapter", str(tmp_path / "aira"), "--out", str(tmp_path / "o")]
    capsys.readouterr()  # the calibration's progress bars
    assert cli_main(args + ["--max_rank", str(too_small)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and f"{over} of {len(needed)} modules" in error, error
    assert f"pass `--max_rank {largest}` or more" in error and "`--truncate`" in error
    assert not (tmp_path / "o").exists()
    assert cli_main(args + ["--max_rank", str(largest)]) == 0
    with open(tmp_path / "o" / "aira_moe_export.json", encoding="utf-8") as handle:
        report = json.load(handle)
    assert report["r"] == largest and report["truncated"] == {} and report["rank_needed"] == needed
