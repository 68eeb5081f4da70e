"""Inference on a bitsandbytes 4-/8-bit base keeps the adapter unmerged, as LLaMA-Factory does for LoRA: the stock
ChatModel (what ``llamafactory-cli chat`` / ``api`` / ``webchat`` load through) and ``aira-moe eval --quantization_bit``,
on CPU with real bitsandbytes. ``export`` still merges, and refuses a quantised target (tests/test_qlora.py)."""

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("llamafactory")
pytest.importorskip("bitsandbytes")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

from aira_moe import AiraMoeConfig  # noqa: E402
from aira_moe.tiny import build_tiny_assets  # noqa: E402

ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}


def perturbed_adapter(model_dir: str, out: str, config) -> str:
    """An adapter with non-zero, random weights (a trained one in all that matters here), saved to ``out``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), config)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("quantized_inference")
    assets = build_tiny_assets(str(root / "tiny"))
    aira = AiraMoeConfig(r=4, lora_alpha=8, num_A=2, num_B=3, target_modules="all-linear", init_weights=False)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    return {"assets": assets, "aira_moe": perturbed_adapter(assets["model"], str(root / "aira_moe"), aira),
            "lora": perturbed_adapter(assets["model"], str(root / "lora"), lora), "root": root}


CHAT_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from llamafactory.chat import ChatModel
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    model_dir, cases = sys.argv[1], json.loads(sys.argv[2])
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    for kind, adapter, bits in cases:
        args = dict(model_name_or_path=model_dir, adapter_name_or_path=adapter, finetuning_type=kind,
                    template="default", infer_backend="huggingface", max_new_tokens=3, do_sample=False)
        if bits:
            args["quantization_bit"] = bits
        chat = ChatModel(args)
        model = chat.engine.model
        reply = chat.chat([{"role": "user", "content": "What is 2 + 3?"}])[0].response_text
        with torch.no_grad():
            got = model(ids).logits.float()
            # the reference: the same base (LLaMA-Factory's own quantisation config) + peft's unmerged adapter
            base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=model.dtype, device_map={"": "cpu"},
                quantization_config=model.config.quantization_config if bits else None)
            reference = PeftModel.from_pretrained(base, adapter).eval()
            want = reference(ids).logits.float()
            with reference.disable_adapter():
                base_logits = reference(ids).logits.float()
        layers = {type(m).__name__ for m in model.modules()}
        print("CASE", json.dumps({"kind": kind, "bits": bits, "peft": isinstance(model, PeftModel),
            "layers": sorted(n for n in layers if n in ("Linear4bit", "Linear8bitLt", "Linear") or "Lora" in n),
            "max_diff": (got - want).abs().max().item(), "adapter_effect": (want - base_logits).abs().max().item(),
            "reply": reply}), flush=True)
    """
)


@pytest.mark.slow
def test_chat_model_keeps_the_adapter_unmerged_on_a_4bit_base_and_merges_on_a_float_base(adapters):
    cases = [(kind, adapters[kind], bits) for kind in ("aira_moe", "lora") for bits in (4, None)]
    result = subprocess.run([sys.executable, "-c", CHAT_SCRIPT, adapters["assets"]["model"], json.dumps(cases)],
                            capture_output=True, text=True, env=ENV, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = {(row["kind"], row["bits"]): row for row in
            (json.loads(line[5:]) for line in result.stdout.splitlines() if line.startswith("CASE "))}
    assert len(rows) == 4, result.stdout
    for kind in ("aira_moe", "lora"):
        quantised, floating = rows[(kind, 4)], rows[(kind, None)]
        # 4-bit: a PeftModel over Linear4bit layers, exactly peft's unmerged adapter on the same quantised base
        assert quantised["peft"] and "Linear4bit" in quantised["layers"], quantised
        assert quantised["max_diff"] == 0.0 and quantised["adapter_effect"] > 1e-3, quantised
        # float: merged into the base (a plain model), equal to the unmerged adapter up to fp32 rounding
        assert not floating["peft"] and floating["max_diff"] < 1e-4, floating
        assert quantised["reply"] and floating["reply"]


def eval_args(adapters, save_dir, **overrides):
    from aira_moe.evaluation import EvalArguments

    assets = adapters["assets"]
    values = dict(model_name_or_path=assets["model"], adapter_name_or_path=adapters["aira_moe"],
                  finetuning_type="aira_moe", task="fineval", task_dir=assets["task_dir"], n_shot=0, batch_size=16,
                  save_dir=str(save_dir), device="cpu")
    values.update(overrides)
    return EvalArguments(**values)


def test_aira_moe_eval_4bit_scores_the_unmerged_adapter_on_the_quantised_base(adapters, tmp_path):
    """The CLI's per-question log-probabilities equal those of the adapter loaded unmerged by peft onto a 4-bit base
    built here, and differ from the 4-bit base alone."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from aira_moe.evaluation import evaluate

    result = subprocess.run(["aira-moe", "eval", "--model_name_or_path", adapters["assets"]["model"],
                             "--adapter_name_or_path", adapters["aira_moe"], "--finetuning_type", "aira_moe",
                             "--task", "fineval", "--task_dir", adapters["assets"]["task_dir"], "--n_shot", "0",
                             "--batch_size", "16", "--save_dir", str(tmp_path / "cli"), "--device", "cpu",
                             "--quantization_bit", "4"], capture_output=True, text=True, env=ENV, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    cli = [json.loads(line) for line in (tmp_path / "cli" / "predictions.jsonl").read_text().splitlines()]

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(adapters["assets"]["model"], dtype=torch.float32, quantization_config=config,
                                                device_map={"": "cpu"})
    model = PeftModel.from_pretrained(base, adapters["aira_moe"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(adapters["assets"]["model"])
    tokenizer.padding_side = "left"
    reference = evaluate(eval_args(adapters, tmp_path / "ref"), model=model, tokenizer=tokenizer, device="cpu", quiet=True)
    with model.disable_adapter():
        base_only = evaluate(eval_args(adapters, tmp_path / "base"), model=model, tokenizer=tokenizer, device="cpu",
                             quiet=True)
    rows = {name: [json.loads(line) for line in (tmp_path / name / "predictions.jsonl").read_text().splitlines()]
            for name in ("ref", "base")}
    assert len(cli) == len(rows["ref"]) == reference["num_questions"] > 0
    diff = max(abs(a["logprobs"][k] - b["logprobs"][k]) for a, b in zip(cli, rows["ref"]) for k in "ABCD")
    effect = max(abs(a["logprobs"][k] - b["logprobs"][k]) for a, b in zip(cli, rows["base"]) for k in "ABCD")
    assert diff < 1e-5 and effect > 1e-3, (diff, effect)
    assert base_only["num_questions"] == reference["num_questions"]


@pytest.mark.parametrize("bits", [8])
def test_eval_loader_keeps_the_adapter_unmerged_on_an_8bit_base(adapters, tmp_path, bits):
    from aira_moe.evaluation.runner import load_model_and_tokenizer
    from aira_moe.tuner import AiraMoeLayer

    model, _, _ = load_model_and_tokenizer(eval_args(adapters, tmp_path, quantization_bit=bits))
    layers = [m for m in model.modules() if isinstance(m, AiraMoeLayer)]
    assert isinstance(model, PeftModel) and layers and not any(layer.merged for layer in layers)
    assert {layer.base_quantization for layer in layers} == {"8bit"}


@pytest.mark.parametrize("overrides, message", [
    ({"quantization_bit": 3}, "`quantization_bit` must be 4 or 8, got 3"),
    ({"quantization_bit": 4, "adapter_name_or_path": "A,B"}, "lists 2 adapters, but a 4-bit base keeps its adapter"),
])
def test_eval_quantization_errors_name_the_key(adapters, tmp_path, overrides, message):
    if "adapter_name_or_path" in overrides:
        overrides["adapter_name_or_path"] = f"{adapters['aira_moe']},{adapters['lora']}"
    with pytest.raises(ValueError, match=message):
        eval_args(adapters, tmp_path, **overrides).validate()


DO_EVAL_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from llamafactory.train.tuner import run_exp
    base, cases = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    for kind, adapter, bits, out in cases:
        args = dict(base, finetuning_type=kind, adapter_name_or_path=adapter, output_dir=out)
        if bits:
            args["quantization_bit"] = bits
        run_exp(args)
    from llamafactory.train.tuner import export_model
    for kind, adapter, bits, out in cases:
        if bits:  # export merges, so a quantised base is refused (LLaMA-Factory's own check, for both methods)
            try:
                export_model(dict(model_name_or_path=base["model_name_or_path"], adapter_name_or_path=adapter,
                                  finetuning_type=kind, template="default", quantization_bit=bits,
                                  export_dir=out + "_export"))
            except ValueError as error:
                print("EXPORT", kind, error, flush=True)
    """
)


@pytest.mark.slow
def test_llamafactory_do_eval_and_export_for_lora_and_aira_moe_on_float_and_4bit_bases(adapters):
    """LLaMA-Factory's export refuses a 4-bit base for both methods (it would merge); its evaluation path (`do_eval` without `do_train`: the model is loaded for inference) for each
    method x base, in one process. (`predict_with_generate` needs jieba / nltk / rouge-chinese, not installed here.)"""
    assets, root = adapters["assets"], adapters["root"]
    base = {"model_name_or_path": assets["model"], "stage": "sft", "do_eval": True, "eval_dataset": assets["dataset"],
            "dataset_dir": assets["dataset_dir"], "max_samples": 8, "template": "default", "cutoff_len": 64,
            "per_device_eval_batch_size": 4, "report_to": "none", "use_cpu": True}
    cases = [(kind, adapters[kind], bits, str(root / f"do_eval_{kind}_{bits}")) for kind in ("aira_moe", "lora")
             for bits in (4, None)]
    result = subprocess.run([sys.executable, "-c", DO_EVAL_SCRIPT, json.dumps(base), json.dumps(cases)],
                            capture_output=True, text=True, env=ENV, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    losses = {}
    for kind, _, bits, out in cases:
        with open(os.path.join(out, "eval_results.json"), encoding="utf-8") as handle:
            losses[(kind, bits)] = json.load(handle)["eval_loss"]
    assert all(map(math.isfinite, losses.values())), losses
    for kind in ("aira_moe", "lora"):  # 4-bit and float bases differ by the base's quantisation error only
        assert abs(losses[(kind, 4)] - losses[(kind, None)]) < 0.05 * losses[(kind, None)], losses
        assert f"EXPORT {kind} Cannot merge adapters to a quantized model." in result.stdout, result.stdout[-2000:]
        assert not os.path.exists(str(root / f"do_eval_{kind}_4_export"))


@pytest.mark.parametrize("bits", [4])
def test_eval_loader_keeps_a_lora_adapter_unmerged_on_a_4bit_base_too(adapters, tmp_path, bits):
    from aira_moe.evaluation.runner import load_model_and_tokenizer

    model, _, _ = load_model_and_tokenizer(eval_args(adapters, tmp_path, quantization_bit=bits, finetuning_type="lora",
                                                     adapter_name_or_path=adapters["lora"]))
    assert isinstance(model, PeftModel) and model.peft_config["default"].peft_type == "LORA"
    assert {type(m.base_layer).__name__ for m in model.modules() if hasattr(m, "lora_A")} == {"Linear4bit"}


@pytest.mark.slow
def test_llamafactory_api_serves_aira_moe_on_a_4bit_base(adapters, tmp_path):
    """`llamafactory-cli api` (the OpenAI-style server; webchat loads through the same ChatModel) answers a chat
    request with the adapter kept unmerged on a 4-bit base."""
    import socket
    import time
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = tmp_path / "api.yaml"
    config.write_text(json.dumps({"model_name_or_path": adapters["assets"]["model"], "adapter_name_or_path":
                                  adapters["aira_moe"], "finetuning_type": "aira_moe", "template": "default",
                                  "infer_backend": "huggingface", "quantization_bit": 4, "max_new_tokens": 3}))
    server = subprocess.Popen(["llamafactory-cli", "api", str(config)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env={**ENV, "API_PORT": str(port)})
    try:
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/chat/completions", headers={"Content-Type": "application/json"},
            data=json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "What is 2 + 3?"}],
                             "max_tokens": 3}).encode())
        deadline, reply = time.time() + 600, None
        while reply is None and server.poll() is None and time.time() < deadline:
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    reply = json.load(response)
            except OSError:
                time.sleep(1)
    finally:
        server.terminate()
        log = server.communicate(timeout=60)[0]
    assert reply is not None, log[-3000:]
    assert reply["choices"][0]["message"]["role"] == "assistant" and reply["usage"]["completion_tokens"] >= 1, reply
    assert "aira_moe: loaded adapter" in log and "(unmerged)" in log, log[-3000:]
