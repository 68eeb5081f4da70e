"""How a multiple-choice question becomes a chat prompt (documented in docs/evaluation.md)."""

from __future__ import annotations

import random

from ..errors import UserError
from .tasks import LETTERS, Question, Subject

SYSTEM = {
    "en": "The following are multiple choice questions (with answers) about {title}.\n\n",
    "zh": "以下是中国关于{title}考试的单项选择题，请选出其中的正确答案。\n\n",
}


def format_question(question: Question) -> str:
    """'<question>\\nA. <a>\\nB. <b>\\nC. <c>\\nD. <d>\\nAnswer:'"""
    options = "".join(f"\n{letter}. {option}" for letter, option in zip(LETTERS, question.options))
    return f"{question.question}{options}\nAnswer:"


def select_shots(subject: Subject, n_shot: int, seed: int) -> list[Question]:
    """``n_shot`` examples drawn from the subject's dev split with random.Random(seed) (the same for every question)."""
    if n_shot == 0:
        return []
    if len(subject.dev) < n_shot:
        raise UserError(
            f"`n_shot`={n_shot} but subject {subject.name!r} has {len(subject.dev)} dev examples in `task_dir`; "
            "lower n_shot (0 works for every task)"
        )
    return random.Random(seed).sample(subject.dev, n_shot)


def build_messages(subject: Subject, question: Question, shots: list[Question], lang: str) -> tuple[str, list[dict]]:
    """(system, messages): each shot is a user turn (the formatted question) answered by an assistant turn (the letter);
    the scored question is the last user turn, followed by its answer turn (the template encodes the prompt up to it)."""
    if lang not in SYSTEM:
        raise UserError(f"`lang` must be one of {sorted(SYSTEM)}, got {lang!r}")
    messages = []
    for shot in shots + [question]:
        messages.append({"role": "user", "content": format_question(shot)})
        messages.append({"role": "assistant", "content": shot.answer})
    return SYSTEM[lang].format(title=subject.title), messages
