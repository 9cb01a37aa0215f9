"""Multiple-choice accuracy in the C-Eval / CMMLU / MMLU CSV layout (question, A, B, C, D, answer).

Each question is shown with its four options and a cue ("Answer:" / "答案："); the prediction is
the option whose first token gets the highest next-token logit. The first token of each option
letter is found by tokenizing prompt+letter and taking the first id after the prompt's ids, so
tokenizers that merge a leading space into the letter are handled.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import CorruptFileError, InputError

COLUMNS = ("question", "A", "B", "C", "D", "answer")


class UnscorableError(InputError):
    """This tokenizer cannot be scored on this multiple-choice set (its option letters do not begin
    with distinct tokens): the report skips the column with this note, and computes the rest."""
_CJK = re.compile(r"[\u4e00-\u9fff]")


@dataclass(frozen=True)
class Question:
    question: str
    options: tuple[str, str, str, str]
    answer: str

    def prompt(self) -> str:
        cue = "答案：" if _CJK.search(self.question) else "Answer:"
        lines = [self.question, *(f"{letter}. {text}" for letter, text in zip("ABCD", self.options)), cue]
        return "\n".join(lines)


def load_mc(path: Path) -> list[Question]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except UnicodeDecodeError:
        raise CorruptFileError(f"{path}: not UTF-8 text") from None
    rows = list(csv.reader(text.splitlines()))
    if not rows:
        raise InputError(f"{path}: empty multiple-choice file")
    header = [h.strip() for h in rows[0]]
    if not all(c in header for c in COLUMNS):
        missing = [c for c in COLUMNS if c not in header]
        raise CorruptFileError(f"{path}: wrong columns {header} (missing {', '.join(missing)}; "
                               f"expected id,question,A,B,C,D,answer)")
    idx = {c: header.index(c) for c in COLUMNS}
    out = []
    for n, row in enumerate(rows[1:], 2):
        if not any(cell.strip() for cell in row):
            continue
        try:
            q = Question(row[idx["question"]], tuple(row[idx[c]] for c in "ABCD"), row[idx["answer"]].strip())
        except IndexError:
            raise CorruptFileError(f"{path}:{n}: row has {len(row)} fields, expected {len(header)}") from None
        if q.answer not in ("A", "B", "C", "D"):
            raise CorruptFileError(f"{path}:{n}: answer '{q.answer}' is not one of A, B, C, D")
        out.append(q)
    if not out:
        raise InputError(f"{path}: no questions")
    return out


def choice_token_ids(encode, prompt: str, sep: str = " ") -> tuple[list[int], list[int]]:
    """Context ids, and for each option letter the id that follows them when the letter is appended.

    The context is the prefix shared by the prompt's ids and all four "prompt + sep + letter"
    encodings, so a tokenizer that merges the cue's last character with the letter is still scored
    fairly. `sep` is what stands between cue and letter in the benchmark's shots ("Answer: A",
    "答案：A").
    """
    encodings = [encode(prompt + sep + letter) for letter in "ABCD"]
    base = encode(prompt)
    k = 0
    while all(k < len(e) for e in encodings) and k < len(base) and len({e[k] for e in encodings} | {base[k]}) == 1:
        k += 1
    firsts = [e[k] if k < len(e) else -1 for e in encodings]
    if -1 in firsts or len(set(firsts)) != 4:
        raise UnscorableError("the four option letters do not start with distinct tokens after the prompt "
                              "(first-token scoring needs them distinct)")
    return base[:k], firsts


def predict(encode, logits_fn, prompt: str, sep: str = " ", context: int | None = None) -> tuple[str, bool]:
    """The option letter whose token gets the highest next-token logit after `prompt`, and whether
    the prompt had to be cut to its last `context` tokens to fit."""
    ids, letters = choice_token_ids(encode, prompt, sep)
    cut = context is not None and len(ids) > context
    if cut:
        ids = ids[-context:]
    last = logits_fn(ids)[-1]
    return "ABCD"[int(last[letters].argmax())], cut


def mc_accuracy(encode, logits_fn, questions: list[Question], advance=lambda: None) -> dict:
    correct = 0
    for q in questions:
        pred, _ = predict(encode, logits_fn, q.prompt())
        correct += pred == q.answer
        advance()
    return {"questions": len(questions), "correct": correct, "accuracy": correct / len(questions)}
