"""Faults, with real processes and real signals: truncated or corrupt adapter files are named in one line (exit 2) by
every entry point, a run killed with SIGKILL (during calibration, during a checkpoint save) is resumed from the last
complete checkpoint or restarted cleanly, and a second run into a live run's output_dir is refused."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from aira_moe import AiraMoeConfig
from aira_moe.adapter_paths import AdapterFileError, require_adapter_dirs
from aira_moe.tiny import build_tiny_assets

ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
FILES = ("adapter_model.safetensors", "adapter_config.json", "aira_moe_allocation.json")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_tiny_assets(str(tmp_path_factory.mktemp("faults")))


def saved_adapter(model_dir, out, safe=True):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           AiraMoeConfig(r=2, num_A=2, num_B=2, target_modules=["q_proj", "v_proj"], init_weights=False))
    model.save_pretrained(out, safe_serialization=safe)
    (out / "aira_moe_allocation.json").write_text(json.dumps({"rank_sum": 4, "layers": []}))
    return out


def damage(directory, name, how):
    """Truncate ``name`` to half its bytes, or overwrite its first bytes with garbage."""
    path = directory / name
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if how == "truncate" else b"\xff" * 16 + data[16:])
    return path


@pytest.mark.parametrize("name", FILES + ("adapter_model.bin",))
@pytest.mark.parametrize("how", ["truncate", "garbage"])
def test_every_damaged_adapter_file_is_named(assets, tmp_path, name, how):
    adapter = saved_adapter(assets["model"], tmp_path / "adapter", safe=name != "adapter_model.bin")
    require_adapter_dirs(str(adapter))  # intact: passes
    path = damage(adapter, name, how)
    with pytest.raises(AdapterFileError) as caught:
        require_adapter_dirs(str(adapter))
    message = str(caught.value)
    assert message.startswith(f"corrupt adapter file {path}:") and "\n" not in message, message


def run(command, stdin=None, timeout=600):
    return subprocess.run(command, capture_output=True, text=True, env=ENV, input=stdin, timeout=timeout)


def assert_one_line_exit_2(result, path):
    lines = [line for line in result.stderr.splitlines() if str(path) in line]
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]


@pytest.mark.slow
def test_entry_points_name_the_damaged_file_in_one_line_and_exit_2(assets, tmp_path):
    """aira-moe eval / export-lora / check, and llamafactory-cli chat, each on a differently damaged adapter."""
    adapters = {name: saved_adapter(assets["model"], tmp_path / name.replace(".", "_")) for name in FILES}
    paths = {name: damage(adapters[name], name, "truncate") for name in FILES}

    weights = adapters["adapter_model.safetensors"]
    result = run(["aira-moe", "eval", "--model_name_or_path", assets["model"], "--adapter_name_or_path", str(weights),
                  "--finetuning_type", "aira_moe", "--task", "fineval", "--task_dir", assets["task_dir"],
                  "--save_dir", str(tmp_path / "eval")])
    assert_one_line_exit_2(result, paths["adapter_model.safetensors"])

    config = adapters["adapter_config.json"]
    result = run(["aira-moe", "export-lora", "--adapter", str(config), "--out", str(tmp_path / "lora")])
    assert_one_line_exit_2(result, paths["adapter_config.json"])
    assert not (tmp_path / "lora").exists()

    train = {"model_name_or_path": assets["model"], "adapter_name_or_path": str(adapters["aira_moe_allocation.json"]),
             "stage": "sft", "do_train": True, "finetuning_type": "aira_moe", "lora_target": "q_proj,v_proj",
             "dataset": assets["dataset"], "dataset_dir": assets["dataset_dir"], "template": "default",
             "output_dir": str(tmp_path / "out"), "use_cpu": True, "report_to": "none"}
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(train))
    result = run(["aira-moe", "check", str(tmp_path / "train.yaml")])
    assert_one_line_exit_2(result, paths["aira_moe_allocation.json"])

    chat = {"model_name_or_path": assets["model"], "adapter_name_or_path": str(weights), "finetuning_type": "aira_moe",
            "template": "default", "infer_backend": "huggingface"}
    (tmp_path / "chat.yaml").write_text(yaml.safe_dump(chat))
    result = run(["llamafactory-cli", "chat", str(tmp_path / "chat.yaml")], stdin="hello\nexit\n")
    assert_one_line_exit_2(result, paths["adapter_model.safetensors"])


# Runs llamafactory-cli's own entry point with one fault armed (FAULT): the process kills itself with SIGKILL at a
# chosen point, as an OOM kill or a preempted node would.
FAULTY_LAUNCHER = r'''
import os, signal, sys, time
import llamafactory  # the start-up hook installs aira_moe here
from aira_moe.integrations import llamafactory as seam
fault = os.environ["FAULT"]
if fault == "calibration":  # SIGKILL after the first calibration batch
    original_loader = seam._calibration_loader
    def killing_loader(*args):
        batches = original_loader(*args)
        def batches_then_kill():
            yield batches[0]
            os.kill(os.getpid(), signal.SIGKILL)
        return batches_then_kill()
    seam._calibration_loader = killing_loader
if fault.startswith("save:"):  # in checkpoint-N's save, after the adapter and optimizer, before trainer_state.json
    import transformers
    step, paused, go = fault[5:].split(",")
    original_rng = transformers.Trainer._save_rng_state
    def pause_then_kill(self, output_dir):
        if self.state.global_step == int(step):
            open(paused, "w").close()
            deadline = time.time() + 300
            while not os.path.exists(go) and time.time() < deadline:
                time.sleep(0.2)
            os.kill(os.getpid(), signal.SIGKILL)
        return original_rng(self, output_dir)
    transformers.Trainer._save_rng_state = pause_then_kill
from llamafactory.cli import main
sys.argv = ["llamafactory-cli", "train", sys.argv[1]]
sys.exit(main())
'''


def logged(output_dir):
    with open(os.path.join(output_dir, "trainer_log.jsonl"), encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if '"loss"' in line]


@pytest.mark.slow
def test_sigkill_in_calibration_and_in_a_checkpoint_save_then_a_locked_output_dir(assets, tmp_path):
    pytest.importorskip("llamafactory")
    out = tmp_path / "out"
    train = {"model_name_or_path": assets["model"], "stage": "sft", "do_train": True, "dataset": assets["dataset"],
             "dataset_dir": assets["dataset_dir"], "template": "default", "cutoff_len": 64, "output_dir": str(out),
             "logging_steps": 1, "per_device_train_batch_size": 4, "learning_rate": 1e-3,
             "lr_scheduler_type": "constant", "max_steps": 6, "save_steps": 2, "report_to": "none", "use_cpu": True,
             "seed": 42, "finetuning_type": "aira_moe", "lora_rank": 2, "lora_target": "q_proj,v_proj", "num_A": 2,
             "num_B": 2, "use_awsvd_init": True, "awsvd_collect_steps": 2}
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(train))
    (tmp_path / "launcher.py").write_text(FAULTY_LAUNCHER)
    launch = [sys.executable, str(tmp_path / "launcher.py"), str(config)]

    # 1. SIGKILL during calibration: the lock file stays behind, naming a dead process; no checkpoint exists
    killed = subprocess.run(launch, capture_output=True, text=True, env={**ENV, "FAULT": "calibration"}, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert (out / "aira_moe.lock").is_file() and not list(out.glob("checkpoint-*"))

    # 2. a re-run recognises the stale lock and starts cleanly; it is paused inside checkpoint-4's save
    paused, go = tmp_path / "paused", tmp_path / "go"
    first = subprocess.Popen(launch, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env={**ENV, "FAULT": f"save:4,{paused},{go}"})
    deadline = time.time() + 600
    while not paused.exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    assert paused.exists(), first.communicate()[0][-3000:]
    lock = (out / "aira_moe.lock").read_text()
    assert lock.split() [1] == str(first.pid)
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))

    # 3. a second run into the live run's output_dir is refused in one line; the first run's files are untouched
    second = run(["llamafactory-cli", "train", str(config)])
    assert_one_line_exit_2(second, out)
    assert f"PID {first.pid}" in second.stderr
    assert first.poll() is None and (out / "aira_moe.lock").read_text() == lock
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before

    # ... then the first run is killed half-way through saving checkpoint-4 (no trainer_state.json written)
    go.touch()
    log = first.communicate(timeout=300)[0]
    assert first.returncode == -signal.SIGKILL, log[-3000:]
    assert "removing the stale lock" in log and "aira_moe calibration" in log and "Resuming" not in log
    assert (out / "checkpoint-4" / "adapter_model.safetensors").is_file()
    assert not (out / "checkpoint-4" / "trainer_state.json").exists()
    interrupted = {row["current_steps"]: row["loss"] for row in logged(out)}
    assert sorted(interrupted) == [1, 2, 3, 4]

    # 4. the re-run resumes from checkpoint-2, the last complete one, and repeats steps 3-4 exactly
    result = run(["llamafactory-cli", "train", str(config)])
    assert result.returncode == 0, result.stderr[-4000:]
    assert "ignoring incomplete checkpoint(s)" in result.stderr and "checkpoint-4" in result.stderr
    assert f"resuming from the last complete checkpoint {out / 'checkpoint-2'}" in result.stderr
    assert "calibration skipped" in result.stderr
    resumed = {row["current_steps"]: row["loss"] for row in logged(out)[4:]}
    assert sorted(resumed) == [3, 4, 5, 6] and all(torch.isfinite(torch.tensor(list(resumed.values()))))
    for step in (3, 4):
        assert abs(resumed[step] - interrupted[step]) < 1e-4, (step, resumed[step], interrupted[step])
    assert json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["global_step"] == 4
    assert not (out / "aira_moe.lock").exists()  # released at exit

    # 5. resuming from a named checkpoint whose adapter_config.json is damaged: one line naming it, exit 2
    path = damage(out / "checkpoint-6", "adapter_config.json", "truncate")
    result = run(["llamafactory-cli", "train", str(config), f"resume_from_checkpoint={out / 'checkpoint-6'}"])
    assert_one_line_exit_2(result, path)
