"""``aira-moe demo``, the README's main job: a real fine-tune of SmolLM2-135M-Instruct (``smollm2``, the default), or
the synthetic tiny default (``tiny``, for tests and ``TINY=1``), through the stock ``llamafactory-cli train``."""

from .smollm2 import run_smollm2_demo
from .tiny import run_tiny_demo
from .train import prepare_train_dir

__all__ = ["prepare_train_dir", "run_smollm2_demo", "run_tiny_demo"]
