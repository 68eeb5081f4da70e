"""Benchmark scripts: --help and a reduced-size run on CPU (no timing assertions)."""

import json
import os
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


@pytest.mark.parametrize("script", ["step_time.py", "calibration_time.py", "quality.py", "train_e2e.py"])
def test_help(script):
    assert "usage" in run(script, "--help")


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
    run("quality.py", "--part", "teacher", "--seeds", "1", "--steps", "3", "--out", str(out))
    teacher = json.loads(out.read_text())["teacher"]
    params = {row["params"] for row in teacher.values()}
    assert len(params) == 1  # every method at the same parameter budget


@pytest.mark.skipif(not os.path.isdir(SHARED_TRAIN), reason="needs ../shared/data/train (the quality benchmark's "
                    "real task data, present in this project's workspace, not in a plain clone)")
def test_quality_compare_reduced(tmp_path):
    out = tmp_path / "quality.json"
    run("quality.py", "--part", "compare", "--bases", "pretrained,outliers", "--tasks", "finance",
        "--methods", "lora,cola_basic,aira_full", "--lrs", "3e-3", "--seeds", "2", "--steps", "2", "--batch", "2",
        "--eval_chunks", "4", "--pretrain_steps", "2", "--testbed_dir", str(tmp_path / "testbed"), "--cache", "",
        "--workers", "1", "--out", str(out))
    result = json.loads(out.read_text())
    cell = result["compare"]["outliers"]["finance"]
    assert set(cell) == {"lora", "cola_basic", "aira_full"}
    assert len({row["params"] for row in cell.values()}) == 1  # equal trainable parameters, checked by the harness
    assert len(cell["aira_full"]["test_loss"]["runs"]) == 2 and "paired_diff_vs_lora" in cell["aira_full"]
    stats = result["testbed"]["stats"]
    # the planted outlier channels are really there (the build itself checks that they leave the function unchanged)
    assert max(row["max_over_median"] for row in stats["outliers"]) > 20
    assert (tmp_path / "quality.md").is_file()
