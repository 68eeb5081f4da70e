"""The bundled tiny default (aira_moe.tiny) and the README demo built on it."""

import json
import os
import subprocess
import sys

import pytest

from aira_moe.tiny import COLOURS, THINGS, build_tiny_assets, colour_items

pytest.importorskip("llamafactory")


def test_colour_items_are_balanced_and_answer_by_the_table():
    items = colour_items(64, seed=3)
    assert [sum(item["answer"] == letter for item in items) for letter in "ABCD"] == [16, 16, 16, 16]
    for item in items:
        assert (item["A"], item["B"], item["C"], item["D"]) == COLOURS
        colour = COLOURS["ABCD".index(item["answer"])]
        assert any(f" {thing}" in item["question"] for thing in THINGS[colour])


def test_tiny_assets_built_with_other_settings_are_refused_not_reused(tmp_path):
    target = str(tmp_path / "tiny")
    build_tiny_assets(target, num_layers=2, num_test=8)
    assert build_tiny_assets(target, num_layers=2, num_test=8)["model"].endswith("model")  # same settings: reused
    result = subprocess.run([sys.executable, "-m", "aira_moe.cli", "tiny", "--output_dir", target, "--num_layers", "4"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "'num_layers': 2" in result.stderr
    with open(os.path.join(target, "model", "config.json"), encoding="utf-8") as handle:
        assert json.load(handle)["num_hidden_layers"] == 2  # nothing was overwritten


def test_demo_adapter_learns_its_task_and_output_is_short(tmp_path):
    result = subprocess.run([sys.executable, "-m", "aira_moe.cli", "demo", "--tiny", "--output_dir", str(tmp_path / "demo")],
                            capture_output=True, text=True, timeout=900, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    demo_lines = [line for line in result.stdout.splitlines() if line.startswith("[aira-moe demo]")]
    assert len(result.stdout.splitlines()) <= len(demo_lines) + 2, result.stdout  # LLaMA-Factory's output is in train.log
    scores = {}
    for label in ("base", "aira_moe"):
        with open(tmp_path / "demo" / f"eval_{label}" / "results.json", encoding="utf-8") as handle:
            scores[label] = json.load(handle)["accuracy"]
    assert scores["aira_moe"] - scores["base"] >= 0.30, scores
    with open(tmp_path / "demo" / "train" / "aira_moe_allocation.json", encoding="utf-8") as handle:
        ranks = [row["rank"] for row in json.load(handle)["layers"]]
    assert len(set(ranks)) > 1, ranks  # the planted heavy-tailed layer gets more rank
    assert (tmp_path / "demo" / "train.log").stat().st_size > 0
    printed = next(line for line in demo_lines if "accuracy" in line)
    assert printed.endswith(f"base {scores['base']:.3f} -> aira_moe {scores['aira_moe']:.3f}")

    # from another directory: `aira-moe eval` with its defaults scores the demo adapter as the demo printed, and
    # peft's AutoPeftModelForCausalLM finds the base model the adapter names
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assets, train = tmp_path / "demo" / "assets", tmp_path / "demo" / "train"
    with open(train / "adapter_config.json", encoding="utf-8") as handle:
        assert json.load(handle)["base_model_name_or_path"] == str(assets / "model")
    reload = (
        "import sys, json\n"
        "from aira_moe.cli import main\n"
        f"code = main(['eval', '--model_name_or_path', {str(assets / 'model')!r}, '--adapter_name_or_path', {str(train)!r},"
        f" '--finetuning_type', 'aira_moe', '--task', 'fineval', '--task_dir', {str(assets / 'eval')!r},"
        " '--save_dir', 'eval_defaults', '--device', 'cpu'])\n"
        "from peft import AutoPeftModelForCausalLM\n"
        f"model = AutoPeftModelForCausalLM.from_pretrained({str(train)!r})\n"
        "print('loaded', type(model.base_model).__name__, model.peft_config['default'].peft_type.value)\n"
        "sys.exit(code)\n"
    )
    result = subprocess.run([sys.executable, "-c", reload], capture_output=True, text=True, cwd=elsewhere, timeout=600,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "loaded AiraMoeModel AIRA_MOE" in result.stdout
    with open(elsewhere / "eval_defaults" / "results.json", encoding="utf-8") as handle:
        defaults = json.load(handle)
    assert defaults["args"]["n_shot"] == 0 and defaults["accuracy"] == scores["aira_moe"]

    # a second demo into the same directory is refused as a user error: one line, exit 2, the adapter kept
    before = (train / "adapter_model.safetensors").stat().st_mtime_ns
    again = subprocess.run([sys.executable, "-m", "aira_moe.cli", "demo", "--tiny", "--output_dir", str(tmp_path / "demo")],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and again.stderr.strip() == (
        f"aira-moe demo: {train} exists; pass --overwrite or another --output_dir"), again.stderr[-2000:]
    assert (train / "adapter_model.safetensors").stat().st_mtime_ns == before
