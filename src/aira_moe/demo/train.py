"""What both demos share: the output directory rule and one ``llamafactory-cli train`` run with its log in a file."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

from ..calibration.report import REPORT_JSON
from ..errors import ExistingOutputError


def prepare_train_dir(output_dir: str, overwrite: bool) -> str:
    """``<output_dir>/train``: an existing one is refused without ``overwrite`` (nothing touched), removed with it."""
    train_dir = os.path.join(os.path.abspath(output_dir), "train")
    if os.path.exists(train_dir) and not overwrite:
        raise ExistingOutputError(f"{train_dir} exists; pass --overwrite or another --output_dir")
    return train_dir


def clear_train_dir(train_dir: str) -> None:
    """Remove a previous run's adapter (after ``prepare_train_dir`` allowed it and the assets are ready)."""
    if os.path.exists(train_dir):
        shutil.rmtree(train_dir)


def run_llamafactory_train(config: dict, output_dir: str, say) -> dict:
    """Write ``config`` to ``<output_dir>/demo_train.yaml`` and run the stock ``llamafactory-cli train`` on it on the
    CPU, its output in ``train.log``. Returns the run's ``train_results.json``; a failed run exits (1) printing the log's tail."""
    import yaml

    config_path = os.path.join(output_dir, "demo_train.yaml")
    with open(config_path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(config, handle)
    log_path = os.path.join(output_dir, "train.log")
    say(f"llamafactory-cli train {config_path}  (output: {log_path})")
    with open(log_path, "w", encoding="utf-8") as log:
        finished = subprocess.run(["llamafactory-cli", "train", config_path], stdout=log, stderr=subprocess.STDOUT,
                                  env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    if finished.returncode != 0:
        with open(log_path, encoding="utf-8", errors="replace") as log:
            tail = log.read().splitlines()[-25:]
        raise SystemExit("\n".join(tail) + f"\naira-moe demo: llamafactory-cli train failed (exit {finished.returncode}); "
                         f"full output in {log_path}")
    with open(os.path.join(config["output_dir"], "train_results.json"), encoding="utf-8") as handle:
        return json.load(handle)


def read_allocation(train_dir: str) -> dict:
    with open(os.path.join(train_dir, REPORT_JSON), encoding="utf-8") as handle:
        return json.load(handle)
