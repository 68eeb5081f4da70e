"""The multiple-choice evaluator: rigged-model accuracy, k-shot prompt format, task file layouts, CLI."""

import csv
import json
import math
import os
from types import SimpleNamespace

import pytest
import torch

from aira_moe.evaluation import EvalArguments, evaluate
from aira_moe.evaluation.prompts import build_messages, format_question, select_shots
from aira_moe.evaluation.scoring import left_pad
from aira_moe.evaluation.tasks import Question, Subject, load_task

SHARED_EVAL = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "eval")
ANSWERS = ["A", "A", "A", "B", "C", "D", "A", "B"]


class LetterTokenizer:
    """Characters are tokens (ord); A-D map to their code points."""

    pad_token_id = 0
    eos_token_id = 0
    model_max_length = 4096

    def encode(self, text, add_special_tokens=False):
        return [ord(ch) for ch in text]


class RiggedModel(torch.nn.Module):
    """Always puts the highest next-token logit on 'A', except that a prompt whose last question contains 'pick C'
    gets 'C'. Any position/padding mistake in the scorer changes which logit row is read."""

    def forward(self, input_ids, attention_mask, position_ids):
        logits = torch.zeros(*input_ids.shape, 128)
        logits[..., ord("A")] = 1.0
        for row in range(input_ids.shape[0]):
            text = "".join(chr(i) for i in input_ids[row].tolist() if i)
            if "pick C" in text.rsplit("Answer:", 2)[-2]:
                logits[row, -1, ord("C")] = 2.0
        return SimpleNamespace(logits=logits)


def write_gsm8k(task_dir, answers, questions=None):
    os.makedirs(task_dir / "gsm8k", exist_ok=True)
    with open(task_dir / "gsm8k" / "test.csv", "w", newline="", encoding="cp1252") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "question", "A", "B", "C", "D", "answer", "explanation"])
        for i, answer in enumerate(answers):
            text = (questions or {}).get(i, f"Question {i}?")
            writer.writerow([i, text, "1", "2", "3", "4", answer, "because"])


def simple_encode(messages, system):
    text = system + "".join(m["content"] + ("\n" if m["role"] == "user" else "\n\n") for m in messages[:-1])
    return [ord(ch) for ch in text]


def test_rigged_model_accuracy_is_exact(tmp_path):
    # always 'A': 4 of the 8 answers are A
    write_gsm8k(tmp_path, ANSWERS)
    args = EvalArguments(model_name_or_path="rigged", task="gsm8k", task_dir=str(tmp_path), n_shot=0, batch_size=3,
                         save_dir=str(tmp_path / "out"))
    results = evaluate(args, model=RiggedModel(), tokenizer=LetterTokenizer(), encode=simple_encode, device="cpu")
    assert results["accuracy"] == 0.5 and results["num_questions"] == 8 and results["correct"] == 4
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    # answer loss: -log p(right letter) over a vocabulary of 128 with logit 1 on 'A' and 0 elsewhere, 4 of 8 right 'A'
    answer_loss = pytest.approx(math.log(127 + math.e) - 0.5, abs=1e-6)
    assert saved["per_subject"]["gsm8k"] == {"accuracy": 0.5, "answer_loss": answer_loss, "num_questions": 8, "correct": 4}
    assert saved["answer_loss"] == answer_loss
    # 'pick C' on question 4 (answer C) flips one wrong answer to right: a scorer reading the wrong row misses it
    write_gsm8k(tmp_path, ANSWERS, {4: "pick C"})
    args.overwrite_save_dir = True
    results = evaluate(args, model=RiggedModel(), tokenizer=LetterTokenizer(), encode=simple_encode, device="cpu")
    assert results["correct"] == 5
    # on question 0 (answer A) it flips a right answer to wrong
    write_gsm8k(tmp_path, ANSWERS, {0: "pick C"})
    results = evaluate(args, model=RiggedModel(), tokenizer=LetterTokenizer(), encode=simple_encode, device="cpu")
    assert results["correct"] == 3


def test_max_questions_scores_the_first_n_of_each_subject(tmp_path):
    write_gsm8k(tmp_path, ANSWERS, {0: "pick C"})  # ANSWERS starts A, B: the first three are scored
    args = EvalArguments(model_name_or_path="rigged", task="gsm8k", task_dir=str(tmp_path), max_questions=3,
                         save_dir=str(tmp_path / "out"))
    results = evaluate(args, model=RiggedModel(), tokenizer=LetterTokenizer(), encode=simple_encode, device="cpu")
    assert results["num_questions"] == 3 and results["correct"] == sum(a == "A" for a in ANSWERS[1:3])
    with pytest.raises(ValueError, match="`max_questions` must be >= 1, got 0"):
        EvalArguments(model_name_or_path="rigged", task="gsm8k", task_dir=str(tmp_path), max_questions=0).validate()


def test_existing_results_are_not_overwritten_silently(tmp_path):
    write_gsm8k(tmp_path, ANSWERS)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "results.json").write_text("{}")
    args = EvalArguments(model_name_or_path="rigged", task="gsm8k", task_dir=str(tmp_path), n_shot=0,
                         save_dir=str(tmp_path / "out"))
    with pytest.raises(ValueError, match="already holds results.json"):
        evaluate(args, model=RiggedModel(), tokenizer=LetterTokenizer(), encode=simple_encode, device="cpu")


def test_k_shot_prompt_is_built_as_documented():
    dev = [Question(f"dev {i}?", ("a", "b", "c", "d"), "ABCD"[i]) for i in range(4)]
    subject = Subject("anatomy", "anatomy", [Question("Which bone?", ("x", "y", "z", "w"), "C")], dev)
    shots = select_shots(subject, 2, seed=42)
    assert shots == select_shots(subject, 2, seed=42) and len(shots) == 2
    system, messages = build_messages(subject, subject.test[0], shots, "en")
    assert system == "The following are multiple choice questions (with answers) about anatomy.\n\n"
    assert [m["role"] for m in messages] == ["user", "assistant"] * 3
    assert messages[0]["content"] == f"{shots[0].question}\nA. a\nB. b\nC. c\nD. d\nAnswer:"
    assert messages[1]["content"] == shots[0].answer
    assert messages[-2]["content"] == "Which bone?\nA. x\nB. y\nC. z\nD. w\nAnswer:"
    assert messages[-1]["content"] == "C"
    with pytest.raises(ValueError, match="`n_shot`=5 .* 4 dev examples"):
        select_shots(subject, 5, seed=0)


def test_left_padding_keeps_positions():
    batch = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]


def test_batched_scores_equal_one_at_a_time(tmp_path):
    """A real (tiny) Llama through the LLaMA-Factory template: batch composition must not change predictions."""
    pytest.importorskip("llamafactory")
    from aira_moe.tiny import build_tiny_assets

    assets = build_tiny_assets(str(tmp_path / "tiny"), num_test=24)
    results = {}
    for batch_size in (1, 7):
        args = EvalArguments(model_name_or_path=assets["model"], task="gsm8k", task_dir=assets["task_dir"], n_shot=2,
                             batch_size=batch_size, device="cpu", template="default",
                             save_dir=str(tmp_path / f"eval_{batch_size}"))
        results[batch_size] = evaluate(args)
    assert results[1]["correct"] == results[7]["correct"] and results[1]["num_questions"] == 24


def test_base_save_dir_scores_base_then_adapter_from_one_load_as_two_separate_runs_do(tmp_path):
    """`base_save_dir` (the recipes' before -> after): the base model's and the adapter's results equal those of two
    separate runs to 1e-6 per answer log-probability, and each results.json names what it scored."""
    pytest.importorskip("llamafactory")
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from aira_moe import AiraMoeConfig
    from aira_moe.errors import UserError
    from aira_moe.tiny import build_tiny_assets

    assets = build_tiny_assets(str(tmp_path / "tiny"), num_test=12)
    adapter = str(tmp_path / "adapter")
    get_peft_model(AutoModelForCausalLM.from_pretrained(assets["model"]), AiraMoeConfig(
        r=2, num_A=2, num_B=3, target_modules=["q_proj", "v_proj", "down_proj"], init_weights=False)).save_pretrained(adapter)
    common = dict(model_name_or_path=assets["model"], task="fineval", task_dir=assets["task_dir"], device="cpu",
                  template="default", finetuning_type="aira_moe")
    together = evaluate(EvalArguments(**common, adapter_name_or_path=adapter, save_dir=str(tmp_path / "after"),
                                      base_save_dir=str(tmp_path / "before")), quiet=True)
    base_alone = evaluate(EvalArguments(**common, save_dir=str(tmp_path / "base_alone")), quiet=True)
    alone = evaluate(EvalArguments(**common, adapter_name_or_path=adapter, save_dir=str(tmp_path / "adapter_alone")),
                     quiet=True)

    def logprobs(folder):
        with open(tmp_path / folder / "predictions.jsonl", encoding="utf-8") as handle:
            return [list(json.loads(line)["logprobs"].values()) for line in handle]

    for joint, separate in (("before", "base_alone"), ("after", "adapter_alone")):
        torch.testing.assert_close(torch.tensor(logprobs(joint)), torch.tensor(logprobs(separate)), rtol=0, atol=1e-6)
    with open(tmp_path / "before" / "results.json", encoding="utf-8") as handle:
        before = json.load(handle)
    assert before["args"]["adapter_name_or_path"] is None and before["num_questions"] == 12
    assert before["correct"] == base_alone["correct"] and together["correct"] == alone["correct"]
    assert together["args"]["adapter_name_or_path"] == adapter
    assert logprobs("before") != logprobs("after")  # the random adapter changes the scores
    # refusals before any load: no adapter; one folder for both; a finished base result kept
    with pytest.raises(UserError, match="`base_save_dir` .* `adapter_name_or_path` is empty"):
        EvalArguments(**common, base_save_dir=str(tmp_path / "x")).validate()
    with pytest.raises(UserError, match="are the same directory"):
        EvalArguments(**common, adapter_name_or_path=adapter, save_dir=str(tmp_path / "y"),
                      base_save_dir=str(tmp_path / "y")).validate()
    with pytest.raises(UserError, match=r"`base_save_dir` .*before already holds results.json"):
        EvalArguments(**common, adapter_name_or_path=adapter, save_dir=str(tmp_path / "z"),
                      base_save_dir=str(tmp_path / "before")).validate()


@pytest.mark.skipif(not os.path.isdir(SHARED_EVAL),
                    reason="needs ../shared/data/eval (the real task files, not shipped with the project)")
@pytest.mark.parametrize("task,count", [("gsm8k", 1319), ("fineval", 265), ("mmlu_law", 1534 + 108 + 121),
                                        ("mmlu_medicine", 265 + 173 + 272 + 100 + 135)])
def test_real_task_files_load(task, count):
    subjects = load_task(task, SHARED_EVAL)
    assert sum(len(s.test) for s in subjects) == count
    if task.startswith("mmlu"):
        assert all(len(s.dev) == 5 for s in subjects)
    assert format_question(subjects[0].test[0]).endswith("\nAnswer:")


def test_cli_flags_override_yaml(tmp_path):
    from aira_moe.cli import parse_eval_args

    config = tmp_path / "eval.yaml"
    config.write_text("model_name_or_path: m\ntask: gsm8k\nn_shot: 5\nbatch_size: 2\n")
    args = parse_eval_args([str(config), "--n_shot", "0", "--overwrite_save_dir", "true"])
    assert (args.model_name_or_path, args.n_shot, args.batch_size, args.overwrite_save_dir) == ("m", 0, 2, True)
    # the hint in the "already holds results.json" error works as written: a bare flag
    assert parse_eval_args([str(config), "--overwrite_save_dir"]).overwrite_save_dir is True
    assert parse_eval_args([str(config), "--overwrite_save_dir", "false"]).overwrite_save_dir is False
    with pytest.raises(SystemExit, match="task"):
        parse_eval_args(["--model_name_or_path", "m"])


def test_default_is_zero_shot_even_with_a_dev_split_and_writes_results(tmp_path, monkeypatch, capsys):
    """The default scores the bare question (as SFT data and the demo present it), whatever dev split the task has."""
    write_gsm8k(tmp_path, ANSWERS)
    with open(tmp_path / "gsm8k" / "dev.csv", "w", newline="", encoding="cp1252") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "question", "A", "B", "C", "D", "answer"])
        for i in range(5):
            writer.writerow([i, f"dev {i}?", "1", "2", "3", "4", "B"])
    monkeypatch.chdir(tmp_path)
    recorder = LengthRecorder()
    args = EvalArguments(model_name_or_path="rigged", task="gsm8k", task_dir=str(tmp_path))
    evaluate(args, model=recorder, tokenizer=LetterTokenizer(), encode=simple_encode, device="cpu")
    out = capsys.readouterr().out
    assert args.n_shot == 0
    written = list((tmp_path / "outputs" / "eval").glob("gsm8k-*/results.json"))
    assert len(written) == 1 and f"results: {os.path.join('outputs', 'eval', written[0].parent.name, 'results.json')}" in out
    assert json.loads(written[0].read_text())["args"]["n_shot"] == 0
    # the same prompts as an explicit --n_shot 0, and shorter than --n_shot 5 (which uses the dev split)
    explicit = LengthRecorder()
    evaluate(EvalArguments(model_name_or_path="rigged", task="gsm8k", task_dir=str(tmp_path), n_shot=0,
                           save_dir=str(tmp_path / "zero")), model=explicit, tokenizer=LetterTokenizer(),
             encode=simple_encode, device="cpu", quiet=True)
    five = LengthRecorder()
    evaluate(EvalArguments(model_name_or_path="rigged", task="gsm8k", task_dir=str(tmp_path), n_shot=5,
                           save_dir=str(tmp_path / "five")), model=five, tokenizer=LetterTokenizer(),
             encode=simple_encode, device="cpu", quiet=True)
    assert recorder.lengths == explicit.lengths and all(a < b for a, b in zip(recorder.lengths, five.lengths))


def test_cli_refuses_more_shots_than_the_dev_split_in_one_line_before_loading(tmp_path, capsys):
    from aira_moe.cli import main

    write_gsm8k(tmp_path, ANSWERS)  # gsm8k ships no dev split: only the default 0 works
    code = main(["eval", "--model_name_or_path", str(tmp_path / "no_model_here"), "--task", "gsm8k",
                 "--task_dir", str(tmp_path), "--n_shot", "5", "--save_dir", str(tmp_path / "out")])
    error = capsys.readouterr().err.strip()
    assert code == 2 and error == ("aira-moe eval: `n_shot`=5 but subject 'gsm8k' has 0 dev examples in `task_dir`; "
                                   "lower n_shot (0 works for every task)")
    assert not (tmp_path / "out").exists()


def test_help_shows_every_default(capsys):
    from aira_moe.cli import parse_eval_args

    with pytest.raises(SystemExit):
        parse_eval_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in ("template", "n_shot", "batch_size", "save_dir", "overwrite_save_dir", "device"):
        assert f"--{name}" in text
    assert "(default: default)" in text and "(default: 4)" in text and "(default: False)" in text
    assert "Default 0: the bare question" in text and "as `aira-moe demo` scores it" in text and "(default: 0)" in text


class LengthRecorder(RiggedModel):
    def __init__(self):
        super().__init__()
        self.lengths = []

    def forward(self, input_ids, attention_mask, position_ids):
        self.lengths.extend(attention_mask.sum(-1).tolist())
        return super().forward(input_ids, attention_mask, position_ids)


def test_long_prompts_drop_shots_first_then_are_cut_from_the_left_and_counted(tmp_path):
    write_gsm8k(tmp_path, ANSWERS, {3: "pick C " + "very long question " * 40})  # ~800 characters
    with open(tmp_path / "gsm8k" / "dev.csv", "w", newline="", encoding="cp1252") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "question", "A", "B", "C", "D", "answer"])
        writer.writerows([i, f"Worked example number {i} " * 4, "1", "2", "3", "4", "B"] for i in range(3))
    tokenizer = LetterTokenizer()
    tokenizer.model_max_length = 400  # the bare questions fit (~120 characters with the system line), 3 shots do not
    model = LengthRecorder()
    args = EvalArguments(model_name_or_path="rigged", task="gsm8k", task_dir=str(tmp_path), n_shot=3, batch_size=4,
                         save_dir=str(tmp_path / "out"))
    results = evaluate(args, model=model, tokenizer=tokenizer, encode=simple_encode, device="cpu")
    assert max(model.lengths) <= 400 and len(model.lengths) == 8
    assert results["prompts_shortened"] == 8 and results["context_length"] == 400
    # question 3 (answer A) keeps its end ("... Answer:") after the left cut, and no 'pick C' survives in it,
    # so the rigged model answers A (right); with every question scored, 4 of 8 are A
    assert results["correct"] == 4
    unshortened = evaluate(EvalArguments(model_name_or_path="rigged", task="gsm8k", task_dir=str(tmp_path), n_shot=0,
                                         save_dir=str(tmp_path / "out0")),
                           model=LengthRecorder(), tokenizer=tokenizer, encode=simple_encode, device="cpu")
    assert unshortened["prompts_shortened"] == 1  # only the 800-character question


def test_custom_mapping_task_is_scored_with_predictions_per_question(tmp_path):
    root = tmp_path / "my_exam"
    (root / "dev").mkdir(parents=True)
    (root / "mapping.json").write_text(json.dumps({"tax_law": {"name": "tax law"}, "audit": {"name": "auditing"}}))
    with open(root / "tax_law_test.csv", "w", newline="", encoding="utf-8") as handle:  # ceval-style: header
        writer = csv.writer(handle)
        writer.writerow(["id", "question", "A", "B", "C", "D", "answer", "explanation"])
        writer.writerows([[0, "q0", "a", "b", "c", "d", "A", ""], [1, "pick C", "a", "b", "c", "d", "C", ""],
                          [2, "q2", "a", "b", "c", "d", "B", ""]])
    with open(root / "audit_test.csv", "w", newline="", encoding="utf-8") as handle:  # mmlu-style: no header
        csv.writer(handle).writerows([["q", "a", "b", "c", "d", "D"], ["q", "a", "b", "c", "d", "A"]])
    with open(root / "dev" / "audit_dev.csv", "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([["dev q", "a", "b", "c", "d", "B"]])
    args = EvalArguments(model_name_or_path="rigged", task="my_exam", task_dir=str(tmp_path), n_shot=0,
                         save_dir=str(tmp_path / "out"))
    results = evaluate(args, model=RiggedModel(), tokenizer=LetterTokenizer(), encode=simple_encode, device="cpu")
    flat, picked_c = math.log(127 + math.e), math.log(126 + math.e + math.e ** 2)  # log-partitions of the two rows
    assert results["per_subject"] == {
        "audit": {"accuracy": 0.5, "answer_loss": pytest.approx(flat - 0.5, abs=1e-6), "num_questions": 2, "correct": 1},
        "tax_law": {"accuracy": 2 / 3, "answer_loss": pytest.approx(((flat - 1) + (picked_c - 2) + flat) / 3, abs=1e-6),
                    "num_questions": 3, "correct": 2}}
    rows = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == results["num_questions"] == 5
    assert sum(row["gold"] == row["predicted"] for row in rows) == results["correct"] == 3
    for row in rows:
        assert max(row["logprobs"], key=row["logprobs"].get) == row["predicted"]
        assert all(value <= 0.0 for value in row["logprobs"].values())
    assert [row["predicted"] for row in rows if row["subject"] == "tax_law"] == ["A", "C", "A"]
    with pytest.raises(ValueError, match="or a directory <task_dir>/<task> with a mapping.json"):
        EvalArguments(model_name_or_path="rigged", task="absent", task_dir=str(tmp_path)).validate()

