"""End to end through the stock ``llamafactory-cli`` on the tiny random Llama (CPU, no network)."""

import json
import math
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml

pytest.importorskip("llamafactory")

from aira_moe.tiny import build_tiny_assets  # noqa: E402

pytestmark = pytest.mark.slow
DEEPSPEED_DIR = os.path.join(os.path.dirname(__file__), "..", "configs", "deepspeed")

ALL_TECHNIQUES = {
    "finetuning_type": "aira_moe",
    "lora_rank": 4,
    "lora_alpha": 8,
    "lora_target": "all",
    "num_A": 2,
    "num_B": 3,
    "use_layer_wise_rank": True,
    "rank_budget": 16,
    "min_rank": 1,
    "max_rank": 8,
    "objective_function": "linear",
    "use_awsvd_init": True,
    "awsvd_collect_steps": 4,
    "use_activation_aware": True,
    "activation_aware_mode": "inps",
}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_tiny_assets(str(tmp_path_factory.mktemp("tiny")), num_layers=4)


def train_args(assets, output_dir, **overrides):
    args = {
        "model_name_or_path": assets["model"],
        "stage": "sft",
        "do_train": True,
        "dataset": assets["dataset"],
        "dataset_dir": assets["dataset_dir"],
        "template": "default",
        "cutoff_len": 128,
        "overwrite_cache": True,
        "output_dir": str(output_dir),
        "overwrite_output_dir": True,
        "logging_steps": 1,
        "per_device_train_batch_size": 8,
        "learning_rate": 1e-3,
        "lr_scheduler_type": "constant",  # so a 3-step run is a prefix of a 6-step run (resume test)
        "max_steps": 6,
        "save_steps": 3,
        "report_to": "none",
        "use_cpu": True,
        "plot_loss": True,
        "seed": 42,
        **ALL_TECHNIQUES,
    }
    args.update(overrides)
    return args


def run_cli(command, args, tmp_path, env=None, check=True):
    config = tmp_path / f"{command}_{len(list(tmp_path.iterdir()))}.yaml"
    config.write_text(yaml.safe_dump(args))
    full_env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", **(env or {})}
    result = subprocess.run(["llamafactory-cli", command, str(config)], capture_output=True, text=True, env=full_env, timeout=600)
    log = result.stdout + result.stderr
    if check and result.returncode != 0:
        raise AssertionError(f"llamafactory-cli {command} failed ({result.returncode}):\n{log[-6000:]}")
    return result.returncode, log


def export_lora_merged_logits(adapter_dir, lora_dir, load_base, ids):
    """Logits on ``ids`` of `aira-moe export-lora` of ``adapter_dir``, merged by stock peft into ``load_base()``."""
    from peft import PeftModel

    result = subprocess.run(["aira-moe", "export-lora", "--adapter", str(adapter_dir), "--out", str(lora_dir)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    with torch.no_grad():
        return PeftModel.from_pretrained(load_base(), str(lora_dir)).merge_and_unload().eval()(ids).logits


def logged_losses(output_dir):
    with open(os.path.join(output_dir, "trainer_log.jsonl"), encoding="utf-8") as handle:
        return [json.loads(line)["loss"] for line in handle if '"loss"' in line]


def rank_pattern(path):
    with open(os.path.join(path, "adapter_config.json"), encoding="utf-8") as handle:
        return json.load(handle)["rank_pattern"]


def load_adapter_tensors(path):
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def default_run(assets, tmp_path_factory):
    """(output dir, log) of one 6-step run with every technique: the training and the export tests read it."""
    tmp_path = tmp_path_factory.mktemp("default_run")
    out = tmp_path / "out"
    _, log = run_cli("train", train_args(assets, out), tmp_path)
    return out, log


def test_train_all_techniques(default_run):
    out, log = default_run
    losses = logged_losses(out)
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    pattern = rank_pattern(out)
    assert len(set(pattern.values())) > 1 and len(pattern) == 4 * 7
    assert sum(pattern[f"model.layers.{i}.self_attn.q_proj"] for i in range(4)) == 16
    report = json.loads((out / "aira_moe_allocation.json").read_text())
    assert report["rank_sum"] == 16 and (out / "aira_moe_allocation.png").is_file()
    assert (out / "training_loss.png").is_file()
    tensors = load_adapter_tensors(out)
    # the default 'directions' AwSVD init leaves the base weight alone: no initial pair ships, the channel weights do
    assert not any("aira_moe_init_A" in k for k in tensors) and any("aira_moe_channel_scale" in k for k in tensors)
    assert "aira_moe allocation" in log


def test_resume_matches_the_straight_run_and_a_rerun_overwrites_nothing(assets, tmp_path):
    """One 6-step run, then: resumed from its checkpoint-3 into a new folder it ends at the same weights; run again as
    it is, it trains and overwrites nothing; asked for more steps, it continues from its last checkpoint."""
    # the 'residual' AwSVD init: the base weight holds W - dW0, which the Trainer's reload must not subtract twice
    residual = {"awsvd_mode": "residual", "overwrite_output_dir": False}
    straight = tmp_path / "straight"
    run_cli("train", train_args(assets, straight, **residual), tmp_path)
    resumed = tmp_path / "resumed"
    _, log = run_cli(
        "train", train_args(assets, resumed, resume_from_checkpoint=str(straight / "checkpoint-3"), **residual), tmp_path)
    assert "calibration skipped" in log and "aira_moe calibration" not in log
    assert rank_pattern(resumed) == rank_pattern(straight / "checkpoint-3") == rank_pattern(straight)
    a, b = load_adapter_tensors(straight), load_adapter_tensors(resumed)
    assert a.keys() == b.keys() and any("aira_moe_init_A" in k for k in a)
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5), key

    before = {name: (straight / name).read_bytes()
              for name in ("all_results.json", "trainer_state.json", "adapter_model.safetensors")}
    code, log = run_cli("train", train_args(assets, straight, **residual), tmp_path)
    assert code == 0 and "is complete (6 of 6 steps)" in log and "overwrite_output_dir: true" in log
    assert "aira_moe calibration" not in log and "Resuming training" not in log
    assert {name: (straight / name).read_bytes() for name in before} == before
    # asking for more steps than the finished run made continues it from its last checkpoint
    code, log = run_cli("train", train_args(assets, straight, max_steps=7, **residual), tmp_path)
    assert "Resuming training" in log and "calibration skipped" in log
    assert json.loads((straight / "trainer_state.json").read_text())["global_step"] == 7


def test_export_merges_exactly_and_chat_loads(assets, default_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, _ = default_run
    export_dir = tmp_path / "merged"
    run_cli(
        "export",
        {
            "model_name_or_path": assets["model"],
            "adapter_name_or_path": str(out),
            "finetuning_type": "aira_moe",
            "template": "default",
            "export_dir": str(export_dir),
            "export_device": "cpu",
        },
        tmp_path,
    )
    ids = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32).eval()(ids).logits
        base = AutoModelForCausalLM.from_pretrained(assets["model"], dtype=torch.float32)
        adapted = PeftModel.from_pretrained(base, str(out)).eval()(ids).logits
    assert ((merged - adapted).norm() / adapted.norm()).item() <= 1e-4

    # the standard-LoRA export of the same adapter, merged by stock peft, equals llamafactory-cli export
    lora_merged = export_lora_merged_logits(
        out, tmp_path / "lora", lambda: AutoModelForCausalLM.from_pretrained(assets["model"], dtype=torch.float32), ids)
    assert ((lora_merged - merged).norm() / merged.norm()).item() <= 1e-4

    script = (
        "from llamafactory.chat import ChatModel\n"
        f"chat = ChatModel(dict(model_name_or_path={assets['model']!r}, adapter_name_or_path={str(out)!r}, "
        "finetuning_type='aira_moe', template='default', infer_backend='huggingface', max_new_tokens=4, do_sample=False))\n"
        "print('REPLY', repr(chat.chat([{'role': 'user', 'content': 'What is 2 + 3?'}])[0].response_text))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "REPLY" in result.stdout


def test_torchrun_two_processes_under_deepspeed_zero2(assets, tmp_path):
    """The recipes' launch shape: torchrun, two processes, the ZeRO-2 config the scripts pass."""
    out = tmp_path / "ddp_z2"
    args = train_args(assets, out, deepspeed=os.path.join(DEEPSPEED_DIR, "ds_z2_config.json"))
    _, log = run_cli("train", args, tmp_path, env={"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2"})
    assert "world size: 2" in log
    # DeepSpeed's checkpoint: the optimizer state partitioned over the two ranks
    assert sorted(path.name for path in (out / "checkpoint-3" / "global_step3").glob("zero_pp_rank_*_optim_states.pt")) \
        == ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert len(set(rank_pattern(out).values())) > 1
    assert all(torch.isfinite(torch.tensor(logged_losses(out))))


def test_deepspeed_zero3_single_process(assets, tmp_path):
    """Partitioned weights, with ``use_dora`` (whose forward reads the whole base weight for its row norms)."""
    out = tmp_path / "z3"
    args = train_args(assets, out, deepspeed=os.path.join(DEEPSPEED_DIR, "ds_z3_config.json"), max_steps=3, use_dora=True)
    _, log = run_cli("train", args, tmp_path, env={"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "1"})
    assert "Detected DeepSpeed ZeRO-3" in log
    plain = tmp_path / "plain"
    run_cli("train", train_args(assets, plain, max_steps=3, use_dora=True), tmp_path)
    # the partitioned calibration (layer-by-layer gathers) gives the same ranks as the plain run
    assert rank_pattern(out) == rank_pattern(plain)
    assert logged_losses(out)[0] == pytest.approx(logged_losses(plain)[0], rel=1e-4)
    magnitudes = {key: tensor for key, tensor in load_adapter_tensors(out).items() if "aira_moe_magnitude" in key}
    assert len(magnitudes) == 4 * 7 and all(tensor.dim() == 1 for tensor in magnitudes.values())


def test_stock_lora_still_trains(assets, tmp_path):
    out = tmp_path / "lora"
    args = train_args(assets, out, max_steps=2)
    for key in ALL_TECHNIQUES:
        args.pop(key)
    args.update(finetuning_type="lora", lora_rank=4, lora_target="all")
    run_cli("train", args, tmp_path)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4


def test_bad_value_fails_before_loading_the_model(assets, tmp_path):
    two_layers = build_tiny_assets(str(tmp_path / "two"), num_layers=2)
    args = train_args(assets, tmp_path / "bad", rank_budget=3, min_rank=2, model_name_or_path=two_layers["model"])
    code, log = run_cli("train", args, tmp_path, check=False)
    assert code != 0
    assert re.search(r"`rank_budget`=3 cannot be met by 2 layers with `min_rank`=2", log)
    assert "trainable params" not in log and "Converting format of dataset" not in log


# in process: the CLI's exit and one-line report of a parse error are test_bad_value_fails_before_loading_the_model's
def test_bad_key_value_is_rejected_at_parsing(assets, tmp_path):
    with pytest.raises(ValueError, match=r"`cola_strategy` must be one of \['full', 'heuristic', 'random', 'routed'\], "
                                         r"got 'nested'"):
        parse_train(assets, tmp_path, cola_strategy="nested")


def test_unknown_key_is_still_rejected(assets, tmp_path):
    with pytest.raises(ValueError, match=r"Some keys are not used by the HfArgumentParser: \['num_C'\]"):
        parse_train(assets, tmp_path, num_C=3)


def parse_train(assets, tmp_path, **overrides):
    """LLaMA-Factory's own argument parsing, in process (the start-up hook installed the seam on import)."""
    from llamafactory.hparams.parser import get_train_args

    args = train_args(assets, tmp_path / "parse", **overrides)
    return get_train_args(args)


@pytest.mark.parametrize("spelling", ["aira-moe", "AIRA_MOE", "Aira-Moe"])
def test_near_miss_finetuning_type_gets_did_you_mean(assets, tmp_path, spelling):
    with pytest.raises(ValueError, match=rf"`finetuning_type`='{spelling}' is not a method; did you mean 'aira_moe'"):
        parse_train(assets, tmp_path, finetuning_type=spelling)
    with pytest.raises(ValueError, match=r"must be one of \['lora', 'oft', 'freeze', 'full', 'aira_moe'\], got 'loar'"):
        parse_train(assets, tmp_path, finetuning_type="loar")


def test_dpo_uses_the_disabled_adapter_as_reference_not_a_model_copy(assets, tmp_path):
    from aira_moe.tiny import colour_items, mc_prompt

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    rows = [{"instruction": mc_prompt(item), "input": "", "chosen": item["answer"],
             "rejected": "ABCD"[("ABCD".index(item["answer"]) + 1) % 4]} for item in colour_items(32, seed=5)]
    (data_dir / "pairs.json").write_text(json.dumps(rows))
    (data_dir / "dataset_info.json").write_text(json.dumps({"pairs": {"file_name": "pairs.json", "ranking": True, "columns": {
        "prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected"}}}))
    out = tmp_path / "dpo"
    args = train_args(assets, out, stage="dpo", dataset="pairs", dataset_dir=str(data_dir), max_steps=2, save_steps=2,
                      per_device_train_batch_size=4, pref_beta=0.1, rank_budget=8, min_rank=1, max_rank=4)
    _, log = run_cli("train", args, tmp_path)
    assert "the reference model is the base model with the adapter disabled" in log
    assert "Created reference model" not in log
    assert (out / "adapter_model.safetensors").is_file()
    losses = logged_losses(out)
    assert len(losses) == 2 and abs(losses[0] - math.log(2)) < 1e-3  # step 1: policy == reference, loss = log 2


def test_unsupported_llamafactory_leaves_lora_working_and_names_versions_for_aira_moe(assets, tmp_path):
    """The start-up hook on an LLaMA-Factory outside the tested range (faked by narrowing the table before import):
    a warning, a stock lora parse that works, and aira_moe refused at parsing with both versions named."""
    lora = {key: value for key, value in train_args(assets, tmp_path / "out").items() if key not in ALL_TECHNIQUES}
    lora.update(finetuning_type="lora", lora_rank=4, lora_target="all")
    script = textwrap.dedent(f"""
        import json, warnings
        import aira_moe_startup
        aira_moe_startup.SUPPORTED["llamafactory"] = ("0.0.1", "0.0.2")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import llamafactory
        assert any("aira_moe is not registered" in str(w.message) for w in caught), [str(w.message) for w in caught]
        from llamafactory.hparams import get_train_args
        args = json.loads({json.dumps(json.dumps(lora))})
        assert get_train_args(args)[3].finetuning_type == "lora"
        try:
            get_train_args({{**args, "finetuning_type": "aira_moe"}})
        except ValueError as error:
            print("REFUSED", error)
    """)
    env = {key: value for key, value in os.environ.items() if key != "AIRA_MOE_DISABLE_STARTUP"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"REFUSED `finetuning_type: aira_moe`: aira_moe supports llamafactory >= 0\.0\.1, < 0\.0\.2; "
                     r"the installed llamafactory is 0\.9\.5", result.stdout), result.stdout[-2000:]


def test_aira_moe_keys_under_another_finetuning_type_are_an_error(assets, tmp_path):
    # every aira_moe key of ALL_TECHNIQUES left in place under finetuning_type lora: named, not silently ignored
    with pytest.raises(ValueError, match=r"aira_moe keys \['awsvd_collect_steps', 'max_rank', 'num_A'.*'use_layer_wise_rank'\] are set but "
                                         r"`finetuning_type` is 'lora'"):
        parse_train(assets, tmp_path, finetuning_type="lora")
    lora_only = {key: value for key, value in train_args(assets, tmp_path).items() if key not in ALL_TECHNIQUES}
    from llamafactory.hparams.parser import get_train_args

    _, _, _, finetuning_args, _ = get_train_args({**lora_only, "finetuning_type": "lora", "lora_rank": 4})
    assert finetuning_args.finetuning_type == "lora"


def test_routed_trains_logs_routing_resumes_exactly_chats_and_refuses_export(assets, tmp_path):
    """`cola_strategy: routed` with every technique: trains with the load-balancing loss (statistics in the log
    history), resumes from a checkpoint to the uninterrupted run's weights, chats unmerged, and `llamafactory-cli
    export` refuses it in one line (exit 2) before loading the model."""
    routed = {"cola_strategy": "routed", "router_top_k": 2, "router_aux_loss_coef": 0.05}
    straight = tmp_path / "straight"
    _, log = run_cli("train", train_args(assets, straight, **routed), tmp_path)
    assert "non-reentrant gradient checkpointing" in log and "aira_moe routing at step 6" in log
    losses = logged_losses(straight)
    assert len(losses) == 6 and all(math.isfinite(loss) for loss in losses)
    history = json.loads((straight / "trainer_state.json").read_text())["log_history"]
    logged = [entry for entry in history if "loss" in entry]
    assert len(logged) == 6 and all(1.0 <= entry["router_aux_loss"] <= 6.0 and entry["routing_entropy"] > 0
                                    and entry["expert_load_min"] <= 1.0 <= entry["expert_load_max"] for entry in logged)
    assert len(set(rank_pattern(straight).values())) > 1
    tensors = load_adapter_tensors(straight)
    assert any("aira_moe_router_weight" in key for key in tensors)

    resumed = tmp_path / "resumed"
    _, log = run_cli("train", train_args(assets, resumed, resume_from_checkpoint=str(straight / "checkpoint-3"),
                                         **routed), tmp_path)
    assert "calibration skipped" in log
    again = load_adapter_tensors(resumed)
    assert again.keys() == tensors.keys()
    for key in tensors:
        assert torch.allclose(again[key], tensors[key], atol=1e-5), key

    script = (
        "from llamafactory.chat import ChatModel\n"
        f"chat = ChatModel(dict(model_name_or_path={assets['model']!r}, adapter_name_or_path={str(straight)!r}, "
        "finetuning_type='aira_moe', template='default', infer_backend='huggingface', max_new_tokens=4, do_sample=False))\n"
        "print('REPLY', repr(chat.chat([{'role': 'user', 'content': 'What is 2 + 3?'}])[0].response_text))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "REPLY" in result.stdout and f"loaded adapter {straight} (unmerged)" in result.stderr

    code, log = run_cli("export", {"model_name_or_path": assets["model"], "adapter_name_or_path": str(straight),
                                   "finetuning_type": "aira_moe", "template": "default",
                                   "export_dir": str(tmp_path / "merged")}, tmp_path, check=False)
    refusals = [line for line in log.splitlines() if "depends on the token" in line]
    assert code == 2 and len(refusals) == 1 and "llamafactory-cli chat / api" in refusals[0]
    assert "all params" not in log and not (tmp_path / "merged").exists()


def test_routed_under_deepspeed_zero3(assets, tmp_path):
    """The router is partitioned like the experts: a routed adapter trains under ZeRO-3 (its load-balancing loss
    included, statistics logged)."""
    out = tmp_path / "z3_routed"
    args = train_args(assets, out, deepspeed=os.path.join(DEEPSPEED_DIR, "ds_z3_config.json"), max_steps=2,
                      cola_strategy="routed", router_top_k=1)
    _, log = run_cli("train", args, tmp_path, env={"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "1"})
    assert "Detected DeepSpeed ZeRO-3" in log
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert [entry["router_aux_loss"] >= 1.0 for entry in history if "loss" in entry] == [True, True]
    assert all(math.isfinite(loss) for loss in logged_losses(out))
