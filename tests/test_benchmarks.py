"""Benchmark scripts: --help and a reduced-size run on CPU (no timing assertions)."""

import json
import os
import runpy
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(__file__), "..", "benchmarks")
SHARED_TRAIN = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "train")


def run(script, *args):
    result = subprocess.run([sys.executable, os.path.join(BENCH, script), *args], capture_output=True, text=True,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result.stdout


@pytest.mark.parametrize("script", ["step_time.py", "calibration_time.py", "quality.py", "quality_real.py", "testbed.py",
                                    "train_e2e.py"])
def test_help(script, capsys, monkeypatch):
    # in this process: a subprocess per script paid ~6 s of imports for what is an argparse check
    monkeypatch.syspath_prepend(BENCH)
    monkeypatch.setattr(sys, "argv", [script])  # argparse's prog
    main = runpy.run_path(os.path.join(BENCH, script), run_name="benchmark_help")["main"]
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith(f"usage: {script}")


def test_step_time_reduced(tmp_path):
    out = tmp_path / "step.json"
    run("step_time.py", "--size", "reduced", "--layers", "2", "--repeats", "1", "--steps", "1", "--warmup", "0",
        "--out", str(out))
    rows = {row["variant"]: row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"lora", "aira_full_2x3", "aira_heuristic_2x3", "aira_random_2x3", "aira_routed_2x3",
                         "aira_techniques_2x3", "aira_techniques_odd_ranks_2x3"}
    assert rows["lora"]["ratio_time_vs_lora"] == 1.0
    # CoLA 2x3 at rank r: r * (2 * in + 3 * out) per module vs LoRA's r * (in + out)
    assert rows["aira_full_2x3"]["trainable_params"] > 2 * rows["lora"]["trainable_params"]


def test_step_time_on_a_4bit_base(tmp_path):
    out = tmp_path / "step.json"
    run("step_time.py", "--size", "reduced", "--layers", "1", "--repeats", "1", "--steps", "1", "--warmup", "0",
        "--bits", "4", "--only", "aira_techniques_2x3", "--out", str(out))
    result = json.loads(out.read_text())
    assert result["bits"] == 4 and {row["variant"] for row in result["rows"]} == {"lora", "aira_techniques_2x3"}


def test_train_e2e_tiny_runs_llamafactory_and_times_steps(tmp_path):
    out = tmp_path / "e2e.json"
    run("train_e2e.py", "--size", "tiny", "--rounds", "1", "--steps", "3", "--warmup", "1", "--only", "aira_all",
        "--assets", str(tmp_path / "assets"), "--out", str(out))
    result = json.loads(out.read_text())
    rows = {row["variant"]: row for row in result["rows"]}
    assert set(rows) == {"lora", "aira_all"} and result["process"] == "one per round"
    assert rows["lora"]["ratio_time_vs_lora"] == 1.0 and rows["aira_all"]["median_step_ms"] > 0
    # one round: the paired ratio is the two runs' step times in that round's shared process
    (ratio,) = rows["aira_all"]["round_ratios_vs_lora"]
    assert ratio == pytest.approx(rows["aira_all"]["per_round_ms"][0] / rows["lora"]["per_round_ms"][0])
    assert rows["aira_all"]["trainable_params"] > rows["lora"]["trainable_params"]


def test_calibration_time_reduced(tmp_path):
    out = tmp_path / "calib.json"
    run("calibration_time.py", "--size", "reduced", "--batches", "1", "--out", str(out))
    result = json.loads(out.read_text())
    assert result["modules"] == 56 and set(result["seconds"]) == {"collect", "allocate", "awsvd", "total"}


def test_quality_teacher_reduced(tmp_path):
    out = tmp_path / "quality.json"
    run("quality.py", "--part", "teacher", "--seeds", "1", "--teacher_steps", "3", "--out", str(out))
    teacher = json.loads(out.read_text())["teacher"]
    params = {row["params"] for row in teacher.values()}
    assert len(params) == 1  # every method at the same parameter budget


@pytest.mark.skipif(not os.path.isdir(SHARED_TRAIN), reason="needs ../shared/data/train (the quality benchmark's "
                    "real task data, present in this project's workspace, not in a plain clone)")
def test_quality_compare_reduced(tmp_path):
    out = tmp_path / "quality.json"
    run("quality.py", "--part", "compare", "--bases", "outliers", "--tasks", "finance",
        "--methods", "lora,cola_basic,aira_full", "--lrs", "3e-3", "--seeds", "2", "--steps", "2", "--batch", "2",
        "--eval_chunks", "4", "--pretrain_steps", "2", "--testbed_dir", str(tmp_path / "testbed"), "--cache",
        str(tmp_path / "runs.jsonl"), "--workers", "1", "--out", str(out))
    result = json.loads(out.read_text())
    runs = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    # the lr search (seed 0) never scored test; the reported seeds 1..2 did
    assert {(row["seed"], "test_loss" in row) for row in runs} == {(0, False), (1, True), (2, True)}
    cell = result["compare"]["outliers"]["finance"]
    assert set(cell) == {"lora", "cola_basic", "aira_full"}
    assert len({row["params"] for row in cell.values()}) == 1  # equal trainable parameters, checked by the harness
    assert len(cell["aira_full"]["test_loss"]["runs"]) == 2 and "paired_diff_vs_lora" in cell["aira_full"]
    stats = result["testbed"]["stats"]
    # the planted outlier channels are really there (the build itself checks that they leave the function unchanged)
    assert max(row["max_over_median"] for row in stats["outliers"]) > 20
    assert (tmp_path / "quality.md").is_file()


# ---------------------------------------------------------------------------------------------- quality.py in-process

@pytest.fixture(scope="module")
def quality_module():
    sys.path.insert(0, BENCH)
    import quality

    return quality


@pytest.fixture(scope="module")
def tiny_testbed(tmp_path_factory):
    """A tiny Llama and a token file with task 't'; its test split holds ids past the vocabulary, so any attempt to
    score it raises (the embedding lookup fails)."""
    import torch
    from conftest import make_tiny_llama

    root = tmp_path_factory.mktemp("tiny_testbed")
    make_tiny_llama(num_layers=2).save_pretrained(root / "base")
    gen = torch.Generator().manual_seed(0)
    tokens = {f"t/{share}": torch.randint(0, 128, (16, 24), generator=gen) for share in ("train", "val")}
    tokens["u/train"] = torch.randint(0, 128, (16, 24), generator=gen)
    tokens["u/val"] = torch.randint(0, 128, (16, 24), generator=gen)
    tokens["t/test"] = tokens["u/test"] = torch.full((4, 24), 10_000)
    torch.save(tokens, root / "tokens.pt")
    return {"tokens": str(root / "tokens.pt"), "base_dir": str(root / "base")}


def tiny_job(tiny_testbed, method, overrides, evaluate=("val",), task="t"):
    return {"base": "tiny", "task": task, "method": method, "overrides": overrides, "lr": 1e-3, "seed": 0,
            "evaluate": list(evaluate), "steps": 3, "batch": 4, "eval_chunks": 4, "threads": 1, **tiny_testbed}


def test_selection_runs_never_score_the_test_split(quality_module, tiny_testbed):
    row = quality_module.run_one(tiny_job(tiny_testbed, "lora", None))
    assert "test_loss" not in row and row["val_loss"] > 0
    with pytest.raises(IndexError):  # the poisoned test split really would fail if it were scored
        quality_module.run_one(tiny_job(tiny_testbed, "lora", None, evaluate=("val", "test")))


def test_multitask_cell_trains_on_the_union_and_scores_each_task(quality_module, tiny_testbed):
    row = quality_module.run_one(tiny_job(tiny_testbed, "lora", None, task="t+u"))
    by_task = row["val_loss_by_task"]
    assert set(by_task) == {"t", "u"} and row["val_loss"] == pytest.approx((by_task["t"] + by_task["u"]) / 2)
    assert quality_module.task_parts("multitask") == ["medicine", "math", "finance"]


@pytest.mark.parametrize("method", ["loraplus_4", "pissa", "eva", "corda", "aira_heuristic", "aira_1x1_no_awsvd",
                                    "cola_routed", "aira_routed", "lora_r11"])
def test_peers_and_forms_run_at_the_lora_budget(quality_module, tiny_testbed, method):
    """Each peer through its library's public API, on the harness's budget (LoRA r=10 on the same projections)."""
    row = quality_module.run_one(tiny_job(tiny_testbed, method, quality_module.METHODS[method]))
    budget = 2 * 10 * (2 * (64 + 64) + 2 * (64 + 32) + 3 * (64 + 128))  # 2 layers x r=10: q/o, k/v, gate/up/down
    assert row["params_budget"] == budget == 20_480
    tolerance = quality_module.REDISTRIBUTED_PARAMS_TOLERANCE if method in ("eva", "cola_routed", "aira_routed", "lora_r11") else 0.0
    assert abs(row["params"] - budget) <= tolerance * budget and row["val_loss"] > 0
    if method in ("cola_routed", "aira_routed"):  # layer-wise ranks keep the sum; r=3 experts (3/4 of CoLA r=4's 20,480) + a router of 6 x (in + 1) per module
        assert row["params"] == 3 * 20_480 // 4 + 2 * 6 * (2 * 64 + 2 * 64 + 2 * 64 + 128 + 7) == 21_588
    if method == "lora_r11":  # the parameter control for routed: +10 %, above routed's +5.4 % here
        assert row["params"] == 11 * 20_480 // 10 == 22_528


def test_loraplus_puts_ratio_times_lr_on_B(quality_module):
    from peft import LoraConfig, get_peft_model
    from conftest import make_tiny_llama

    model = get_peft_model(make_tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    optimizer = quality_module.make_optimizer(model, 1e-3, loraplus_lr_ratio=8)
    lrs = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert lrs[id(param)] == pytest.approx(8e-3 if "lora_B" in name else 1e-3), name


def test_lod_sweep_is_every_threshold_times_reference(quality_module):
    sweep = quality_module.lod_sweep_methods("aira_full", quality_module.METHODS["aira_full"])
    assert len(sweep) == 10
    assert sweep["aira_full_lod_mean_M3"] == {**quality_module.METHODS["aira_full"], "lod_reference": "mean",
                                               "lod_threshold_M": 3.0}
    with pytest.raises(ValueError, match="use_layer_wise_rank"):
        quality_module.lod_sweep_methods("cola_basic", {})


def test_default_methods_are_known_and_cover_every_peer_and_strategy(quality_module):
    members = quality_module.method_members(quality_module.DEFAULT_METHODS)
    assert set(members) <= set(quality_module.METHODS) and len(members) == len(set(members))
    assert set(quality_module.PEERS) <= set(quality_module.DEFAULT_METHODS)
    for strategy in ("basic", "heuristic", "random", "routed"):  # each 2x3 form plain (cola_*) and with every technique
        assert {f"cola_{strategy}", f"aira_{'full' if strategy == 'basic' else strategy}"} <= set(members), strategy
    # a bare rerun reproduces the committed table: the same methods, in the same order
    with open(os.path.join(quality_module.ROOT, "benchmarks", "results", "quality_peers_cpu.json")) as handle:
        committed = json.load(handle)
    assert committed["settings"]["methods"].split(",") == quality_module.DEFAULT_METHODS


def test_overview_tallies_each_cell_against_lora(quality_module):
    def row(rank, diff=None):
        out = {"test_loss": {"mean": 1.0, "std": 0.0, "runs": [1.0, 1.0]}, "rank": rank}
        if diff is not None:
            out["paired_diff_vs_lora"] = {"mean": diff[0], "std": diff[1], "runs": []}
        return out

    results = {"b": {"_no_finetuning": {}, "x": {"lora": row(2), "m": row(1, (-0.004, 0.001))},
                     "y": {"lora": row(1), "m": row(2, (0.002, 0.003))}},
               "c": {"x": {"lora": row(1), "m": row(2, (0.005, 0.001))}}}
    lines = quality_module.overview(results, screen=False)
    assert lines[2] == "| method | b / x | b / y | c / x | ahead / tie / behind |"
    assert lines[4] == "| lora | – (2) | – (1) | – (1) | 0 / 0 / 0 |"
    assert lines[5] == "| m | **-0.0040 ± 0.0010 (1)** | +0.0020 ± 0.0030 (2) | +0.0050 ± 0.0010 (2) | 1 / 1 / 1 |"
    assert quality_module.overview({"b": {"x": results["b"]["x"]}}, screen=False) == []  # one cell: no overview


def test_a_committed_real_model_table_reproduces_from_its_own_numbers(tmp_path, quality_module):
    """--seed_cache_from: the runs rebuilt from a results file give the protocol back that file's numbers without
    training anything (the keys are the ones this script gives the same runs today)."""
    import argparse

    import quality_real

    path = os.path.join(BENCH, "results", "quality_smollm2_cpu_peers_cells.json")
    with open(path) as handle:
        stored = json.load(handle)
    settings = stored["settings"]
    runner = quality_module.Runner("", 1)
    added = runner.add(quality_real.cache_rows_from([path], str(tmp_path), "unused"))
    assert added == len(runner.done) > 0
    original_run = runner.run

    def run_cached_only(jobs):
        missing = [job for job in jobs if quality_module.job_key(job) not in runner.done]
        assert not missing, f"would train {len(missing)} runs, e.g. {missing[0]}"
        return original_run(jobs)

    runner.run = run_cached_only
    methods = {name: quality_real.METHODS[name] for name in ("lora", "dora", "aira_heuristic")}

    def make_job(cell, lr, seed, evaluate=("val",)):
        return quality_real.real_job(settings, stored["data"]["settings"], str(tmp_path), "unused", cell[1], cell[2],
                                     lr, seed, evaluate)

    args = argparse.Namespace(bases=["smollm2"], tasks=settings["tasks"], lrs=settings["lrs"], seeds=settings["seeds"],
                              screen=settings["screen"])
    compared = quality_module.protocol(args, methods, runner, make_job,
                                       lambda base: stored["compare"][base]["_no_finetuning"],
                                       lr_task=settings["lr_task"], metrics=("val_accuracy", "test_accuracy"),
                                       peers=quality_real.PEERS, families=quality_real.FAMILIES, plain="cola_heuristic")
    for task in settings["tasks"]:
        for method in methods:
            mine, theirs = compared["smollm2"][task][method], stored["compare"]["smollm2"][task][method]
            assert (mine["lr"], mine["val_by_lr"], mine["test_loss"]) == (theirs["lr"], theirs["val_by_lr"], theirs["test_loss"])
            if method != "lora":
                assert mine["paired_diff_vs_lora"]["runs"] == theirs["paired_diff_vs_lora"]["runs"]
            if task != "medicine":
                assert mine["test_accuracy"] == theirs["test_accuracy"]
