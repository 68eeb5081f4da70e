"""KTO and PPO through the stock ``llamafactory-cli`` on the tiny model, as DPO is tested in test_llamafactory.py:
the reference pass is the base model with the adapter disabled (no model copy), the first losses are finite (and
KTO's first one is its value at policy == reference), and the adapter is saved."""

import json
import math

import pytest
import torch

pytest.importorskip("llamafactory")

from test_llamafactory import ALL_TECHNIQUES, logged_losses, run_cli, train_args  # noqa: E402

from aira_moe.tiny import build_tiny_assets, colour_items, mc_prompt  # noqa: E402

pytestmark = pytest.mark.slow
# no calibration: the adapter starts at zero, so the policy equals the reference at step 1
PLAIN = {"use_layer_wise_rank": False, "use_awsvd_init": False, "use_activation_aware": False, "lora_rank": 2,
         "num_A": 2, "num_B": 2}
# ALL_TECHNIQUES' keys that only act under a switch PLAIN turns off (set with the switch off, they are refused)
SWITCHED_OFF = ("rank_budget", "min_rank", "max_rank", "objective_function", "awsvd_collect_steps",
                "activation_aware_mode")


def plain_args(assets, output_dir, **overrides):
    args = train_args(assets, output_dir, **PLAIN, **overrides)
    return {key: value for key, value in args.items() if key not in SWITCHED_OFF}
NO_COPY = "the reference model is the base model with the adapter disabled"
TRL_PIN_CLASH = "LLaMA-Factory ppo requires TRL version >=0.8.6,<=0.9.6"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_tiny_assets(str(tmp_path_factory.mktemp("tiny")))


def write_dataset(directory, name, rows, info):
    directory.mkdir(exist_ok=True)
    (directory / f"{name}.json").write_text(json.dumps(rows))
    registry = directory / "dataset_info.json"
    known = json.loads(registry.read_text()) if registry.exists() else {}
    known[name] = {"file_name": f"{name}.json", **info}
    registry.write_text(json.dumps(known))


def test_kto_uses_the_disabled_adapter_as_reference(assets, tmp_path):
    rows = [{"instruction": mc_prompt(item), "input": "",
             "output": item["answer"] if index % 2 == 0 else "ABCD"[("ABCD".index(item["answer"]) + 1) % 4],
             "label": index % 2 == 0} for index, item in enumerate(colour_items(32, seed=5))]
    write_dataset(tmp_path / "data", "kto", rows, {"columns": {"prompt": "instruction", "query": "input",
                                                               "response": "output", "kto_tag": "label"}})
    out = tmp_path / "kto"
    args = plain_args(assets, out, stage="kto", dataset="kto", dataset_dir=str(tmp_path / "data"), max_steps=2,
                      save_steps=2, per_device_train_batch_size=4, pref_beta=0.1)
    _, log = run_cli("train", args, tmp_path)
    assert NO_COPY in log and "Created reference model" not in log
    assert (out / "adapter_model.safetensors").is_file()
    losses = logged_losses(out)
    # step 1: policy == reference, so every log-ratio and the KL estimate are 0 and each example's loss is 1 - sigmoid(0)
    assert len(losses) == 2 and all(map(math.isfinite, losses)) and abs(losses[0] - 0.5) < 1e-3, losses


def tiny_reward_model(assets, directory):
    """The tiny base's weights with a fixed value head: LLaMA-Factory's `reward_model_type: full`."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(assets["model"]).save_pretrained(directory)
    AutoTokenizer.from_pretrained(assets["model"]).save_pretrained(directory)
    hidden = json.loads((directory / "config.json").read_text())["hidden_size"]
    head = torch.randn(1, hidden, generator=torch.Generator().manual_seed(0)) / math.sqrt(hidden)
    save_file({"v_head.summary.weight": head, "v_head.summary.bias": torch.zeros(1)},
              str(directory / "value_head.safetensors"))
    return str(directory)


@pytest.mark.parametrize("finetuning_type", ["aira_moe", "lora"])
def test_ppo(assets, tmp_path, finetuning_type):
    rows = [{"instruction": mc_prompt(item), "input": "", "output": item["answer"]} for item in colour_items(16, seed=6)]
    write_dataset(tmp_path / "data", "prompts", rows, {"columns": {"prompt": "instruction", "query": "input",
                                                                   "response": "output"}})
    out = tmp_path / "ppo"
    args = plain_args(assets, out, stage="ppo", dataset="prompts", dataset_dir=str(tmp_path / "data"), max_steps=2,
                      save_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=1,
                      reward_model=tiny_reward_model(assets, tmp_path / "reward"), reward_model_type="full",
                      max_new_tokens=4, top_k=0, top_p=1.0, plot_loss=False)
    if finetuning_type == "lora":  # the same run with LLaMA-Factory's own LoRA, for comparison
        args = {key: value for key, value in args.items() if key not in ALL_TECHNIQUES}
        args.update(finetuning_type="lora", lora_rank=2, lora_alpha=8, lora_target="all")
    code, log = run_cli("train", args, tmp_path, check=False)
    if finetuning_type == "aira_moe":
        assert NO_COPY in log
    assert "Created reference model" not in log
    if code != 0 and TRL_PIN_CLASH in log:
        # LLaMA-Factory 0.9.5 pins trl <= 0.24 for the package but its PPO trainer requires trl <= 0.9.6 (an
        # unconditional require_version that DISABLE_VERSION_CHECK does not skip): PPO stops at the trainer for LoRA
        # exactly as for aira_moe, after the model, the reference (none) and the reward model are built
        assert "Loaded full weights of reward model" in log, log[-3000:]
        pytest.xfail(f"LLaMA-Factory 0.9.5 PPO needs trl<=0.9.6; installed trl {trl_version()}")
    assert code == 0, log[-6000:]
    assert (out / "adapter_model.safetensors").is_file() and (out / "value_head.safetensors").is_file()
    losses = logged_losses(out)
    assert losses and all(map(math.isfinite, losses)), losses


def trl_version():
    import trl

    return trl.__version__
