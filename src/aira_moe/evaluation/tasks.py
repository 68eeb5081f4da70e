"""Multiple-choice tasks read from a task directory laid out like ``shared/data/eval`` (see docs/evaluation.md)."""

from __future__ import annotations

import csv
import glob
import json
import os
from dataclasses import dataclass

from ..errors import MissingFileError, UserError

LETTERS = ("A", "B", "C", "D")


@dataclass
class Question:
    question: str
    options: tuple[str, str, str, str]
    answer: str  # one of LETTERS


@dataclass
class Subject:
    name: str  # file-level id, e.g. "professional_law"
    title: str  # human name used in the prompt, e.g. "professional law"
    test: list[Question]
    dev: list[Question]  # k-shot examples (empty when the task ships no dev split)


def _read_rows(path: str, encoding: str, header: bool) -> list[Question]:
    with open(path, newline="", encoding=encoding) as handle:
        rows = list(csv.reader(handle))
    if header:
        names = [name.strip() for name in rows[0]]
        rows = [dict(zip(names, row)) for row in rows[1:]]
        items = [(row["question"], tuple(row[letter] for letter in LETTERS), row["answer"]) for row in rows]
    else:
        items = [(row[0], tuple(row[1:5]), row[5]) for row in rows]
    questions = []
    for text, options, answer in items:
        answer = answer.strip()
        if answer not in LETTERS:
            raise UserError(f"{path}: answer must be one of A-D, got {answer!r}")
        questions.append(Question(text, options, answer))
    return questions


def _mapping(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _require(path: str, task: str) -> str:
    if not os.path.exists(path):
        raise MissingFileError(f"task {task!r}: {path} not found; check `task_dir` (layout in docs/evaluation.md)")
    return path


def load_gsm8k(task_dir: str) -> list[Subject]:
    """gsm8k/test.csv: header id,question,A,B,C,D,answer[,explanation]; cp1252 (a superset of the ASCII the tiny
    default writes). Optional gsm8k/dev.csv in the same format provides k-shot examples."""
    root = os.path.join(task_dir, "gsm8k")
    test = _read_rows(_require(os.path.join(root, "test.csv"), "gsm8k"), "cp1252", header=True)
    dev_path = os.path.join(root, "dev.csv")
    dev = _read_rows(dev_path, "cp1252", header=True) if os.path.isfile(dev_path) else []
    return [Subject("gsm8k", "grade school math", test, dev)]


def load_fineval(task_dir: str) -> list[Subject]:
    """fineval/<subject>.csv (UTF-8 with BOM, header question,A,B,C,D,answer,explanation) + mapping.json names;
    optional fineval/dev/<subject>.csv for k-shot."""
    root = os.path.join(task_dir, "fineval")
    mapping = _mapping(os.path.join(root, "mapping.json"))
    subjects = []
    for path in sorted(glob.glob(os.path.join(_require(root, "fineval"), "*.csv"))):
        name = os.path.splitext(os.path.basename(path))[0]
        dev_path = os.path.join(root, "dev", f"{name}.csv")
        dev = _read_rows(dev_path, "utf-8-sig", header=True) if os.path.isfile(dev_path) else []
        title = mapping.get(name, {}).get("name", name.replace("_", " "))
        subjects.append(Subject(name, title, _read_rows(path, "utf-8-sig", header=True), dev))
    if not subjects:
        raise MissingFileError(f"task 'fineval': no CSV files in {root}")
    return subjects


def _mmlu_loader(subject_names: tuple[str, ...], task: str):
    def load(task_dir: str) -> list[Subject]:
        """mmlu/{test,dev}/<subject>_{test,dev}.csv: no header, 6 columns; dev holds the 5 k-shot examples."""
        root = os.path.join(task_dir, "mmlu")
        mapping = _mapping(os.path.join(root, "mapping.json"))
        subjects = []
        for name in subject_names:
            test = _read_rows(_require(os.path.join(root, "test", f"{name}_test.csv"), task), "utf-8", header=False)
            dev_path = os.path.join(root, "dev", f"{name}_dev.csv")
            dev = _read_rows(dev_path, "utf-8", header=False) if os.path.isfile(dev_path) else []
            subjects.append(Subject(name, mapping.get(name, {}).get("name", name.replace("_", " ")), test, dev))
        return subjects

    return load


TASKS = {
    "gsm8k": load_gsm8k,
    "fineval": load_fineval,
    "mmlu_law": _mmlu_loader(("professional_law", "jurisprudence", "international_law"), "mmlu_law"),
    "mmlu_medicine": _mmlu_loader(
        ("clinical_knowledge", "college_medicine", "professional_medicine", "medical_genetics", "anatomy"), "mmlu_medicine"
    ),
}


def _read_rows_any(path: str) -> list[Question]:
    """A CSV with or without the header ``[id,]question,A,B,C,D,answer[,explanation]`` (UTF-8, BOM allowed)."""
    with open(path, newline="", encoding="utf-8-sig") as handle:
        first = next(csv.reader(handle), [])
    return _read_rows(path, "utf-8-sig", header="question" in [cell.strip().lower() for cell in first])


def _split_file(root: str, subject: str, split: str):
    """<root>/<subject>_<split>.csv or <root>/<split>/<subject>_<split>.csv (LLaMA-Factory's mmlu/cmmlu/ceval)."""
    for path in (os.path.join(root, f"{subject}_{split}.csv"), os.path.join(root, split, f"{subject}_{split}.csv")):
        if os.path.isfile(path):
            return path
    return None


def custom_task_dir(task: str, task_dir: str) -> str:
    return os.path.join(task_dir, task)


def load_custom(task: str, task_dir: str) -> list[Subject]:
    """Any task in the layout of the old ``llamafactory-cli eval``: <task_dir>/<task>/mapping.json (subject ->
    {"name": ...}) and per subject <subject>_test.csv (scored; <subject>_val.csv when there is no test file) plus
    optional <subject>_dev.csv (k-shot), directly or under test/ val/ dev/ folders."""
    root = custom_task_dir(task, task_dir)
    mapping = _mapping(os.path.join(root, "mapping.json"))
    if not mapping:
        raise MissingFileError(f"task {task!r}: no mapping.json in {root} (layout in docs/evaluation.md)")
    subjects = []
    for name in sorted(mapping):
        scored = _split_file(root, name, "test") or _split_file(root, name, "val")
        if scored is None:
            raise MissingFileError(f"task {task!r}: no {name}_test.csv or {name}_val.csv in {root}")
        dev_path = _split_file(root, name, "dev")
        subjects.append(Subject(name, mapping[name].get("name", name.replace("_", " ")), _read_rows_any(scored),
                                _read_rows_any(dev_path) if dev_path else []))
    return subjects


def task_exists(task: str, task_dir: str) -> bool:
    return task in TASKS or os.path.isfile(os.path.join(custom_task_dir(task, task_dir), "mapping.json"))


def load_task(task: str, task_dir: str) -> list[Subject]:
    if task in TASKS:
        return TASKS[task](task_dir)
    if not task_exists(task, task_dir):
        raise UserError(f"`task` must be one of {sorted(TASKS)} or a directory <task_dir>/<task> with a mapping.json; "
                        f"got {task!r} (no {os.path.join(custom_task_dir(task, task_dir), 'mapping.json')})")
    return load_custom(task, task_dir)
