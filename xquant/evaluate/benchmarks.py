"""Published benchmarks in their official layouts (C-Eval, CMMLU, MMLU), read from directories the
user downloaded: subjects, few-shot examples and the publishers' prompt.

One registry entry per layout says where a subject's dev (few-shot, with answers) and scored
questions live, which columns they have, and how the prompt reads. Every file is read and checked
when the report starts (`load_benchmark`), so a malformed row is one line naming the file and row
before any model is loaded. Scoring is the multiple-choice scorer's (mc.py): the prediction is the
option letter whose token gets the highest next-token logit after the cue ("答案：" / "Answer:").
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import CorruptFileError, InputError
from .mc import Question, predict

LETTERS = ("A", "B", "C", "D")


@dataclass(frozen=True)
class Layout:
    """Where one benchmark keeps its files and how its prompt reads.

    `dev`/`scored` are (folder, file-name suffix): a subject is the file name without the suffix.
    `columns` names the header cells for question, A, B, C, D, answer (None: no header row, the
    six cells in that order). `sep` goes between the cue and the answer letter, as in the shots."""

    name: str
    title: str
    dev: tuple[str, str]
    scored: tuple[str, str]
    columns: tuple[str, ...] | None
    header: str
    cue: str
    sep: str

    def prompt(self, subject: str, shots: list[Question], q: Question) -> str:
        """The header naming the subject, `shots` with their answers, then the question and the cue."""
        def block(x: Question) -> str:
            return "\n".join([x.question, *(f"{l}. {t}" for l, t in zip(LETTERS, x.options)), self.cue])

        parts = [self.header.format(subject=subject)]
        parts += [block(s) + self.sep + s.answer + "\n\n" for s in shots]
        return "".join(parts) + block(q)


_LAYOUTS: dict[str, Layout] = {}


def register(layout: Layout) -> Layout:
    _LAYOUTS[layout.name] = layout
    return layout


register(Layout("ceval", "C-Eval", dev=("dev", "_dev.csv"), scored=("val", "_val.csv"),
                columns=("question", "A", "B", "C", "D", "answer"),
                header="以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n", cue="答案：", sep=""))
register(Layout("cmmlu", "CMMLU", dev=("dev", ".csv"), scored=("test", ".csv"),
                columns=("Question", "A", "B", "C", "D", "Answer"),
                header="以下是关于{subject}的单项选择题，请直接给出正确答案的选项。\n\n", cue="答案：", sep=""))
register(Layout("mmlu", "MMLU", dev=("dev", "_dev.csv"), scored=("test", "_test.csv"), columns=None,
                header="The following are multiple choice questions (with answers) about {subject}.\n\n",
                cue="Answer:", sep=" "))


def layout(name: str) -> Layout:
    try:
        return _LAYOUTS[name]
    except KeyError:
        raise InputError(f"unknown benchmark '{name}' (known: {', '.join(_LAYOUTS)})") from None


def known() -> list[str]:
    return list(_LAYOUTS)


@dataclass(frozen=True)
class Subject:
    name: str  # the file's stem, as the benchmark names it
    dev: tuple[Question, ...]
    questions: tuple[Question, ...]  # the scored ones, after --limit

    @property
    def title(self) -> str:
        return self.name.replace("_", " ")


@dataclass(frozen=True)
class Benchmark:
    layout: Layout
    path: Path
    subjects: tuple[Subject, ...]

    @property
    def questions(self) -> int:
        return sum(len(s.questions) for s in self.subjects)


def parse_spec(spec: str) -> tuple[str, Path]:
    """'ceval=DIR' -> ('ceval', DIR)."""
    name, eq, path = spec.partition("=")
    if not eq or not path:
        raise InputError(f"--benchmark {spec}: expected NAME=DIR (NAME one of {', '.join(_LAYOUTS)})")
    layout(name.strip())
    return name.strip(), Path(path).expanduser()


def read_questions(path: Path, lay: Layout) -> list[Question]:
    """The questions of one CSV file; a missing column, a short row or an answer outside A-D is a
    CorruptFileError naming the file and row (rows counted as a spreadsheet shows them)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise CorruptFileError(f"{path}: not UTF-8 text") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None
    rows = list(csv.reader(io.StringIO(text)))
    first = 1
    if lay.columns is None:
        idx = list(range(6))
        first = 0
    else:
        if not rows:
            raise CorruptFileError(f"{path}: empty file (expected the header {','.join(lay.columns)})")
        head = [h.strip() for h in rows[0]]
        missing = [c for c in lay.columns if c not in head]
        if missing:
            raise CorruptFileError(f"{path}, row 1: missing column '{missing[0]}' (header {','.join(head)}; "
                                   f"{lay.title} needs {','.join(lay.columns)})")
        idx = [head.index(c) for c in lay.columns]
    out = []
    for n, row in enumerate(rows[first:], first + 1):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) <= max(idx):
            raise CorruptFileError(f"{path}, row {n}: {len(row)} fields, expected at least {max(idx) + 1}")
        cells = [row[i] for i in idx]
        answer = cells[5].strip()
        if answer not in LETTERS:
            raise CorruptFileError(f"{path}, row {n}: answer '{answer}' is not one of A, B, C, D")
        out.append(Question(cells[0], tuple(cells[1:5]), answer))
    return out


def load_benchmark(name: str, path: Path, limit: int | None = None) -> Benchmark:
    """Every subject of a downloaded benchmark directory, checked; `limit` scored questions per subject."""
    lay, path = layout(name), Path(path)
    if not path.is_dir():
        raise InputError(f"{path}: no such directory (--benchmark {name}=DIR: the unpacked {lay.title} download)")
    folder, suffix = lay.scored
    scored = sorted(p for p in (path / folder).glob(f"*{suffix}") if p.is_file())
    if not scored:
        raise InputError(f"{path / folder}: no {lay.title} files '*{suffix}' (expected "
                         f"{folder}/SUBJECT{suffix} and {lay.dev[0]}/SUBJECT{lay.dev[1]})")
    subjects = []
    for f in scored:
        subject = f.name[: -len(suffix)]
        dev_path = path / lay.dev[0] / f"{subject}{lay.dev[1]}"
        if not dev_path.is_file():
            raise InputError(f"{dev_path}: missing (subject '{subject}' has {f} but no dev examples)")
        questions = read_questions(f, lay)
        dev = read_questions(dev_path, lay)
        if not questions:
            raise InputError(f"{f}: no questions")
        subjects.append(Subject(subject, tuple(dev), tuple(questions[:limit] if limit else questions)))
    return Benchmark(lay, path, tuple(subjects))


def fit_prompt(encode, lay: Layout, subject: Subject, q: Question, shots: int, context: int) -> tuple[str, int]:
    """The prompt with as many of the first `shots` dev examples as fit the context (letter included)."""
    k = min(shots, len(subject.dev))
    while True:
        text = lay.prompt(subject.title, list(subject.dev[:k]), q)
        if k == 0 or len(encode(text + lay.sep + "A")) <= context:
            return text, k
        k -= 1


def score_benchmark(encode, logits_fn, bench: Benchmark, shots: int, context: int,
                    plan: list[int] | None = None, advance: Callable[[], None] = lambda: None) -> dict:
    """Accuracy per subject and overall (mean over questions; also the mean over subjects).

    `plan` (shots per question, from the reference's run) makes every artifact see the same
    prompts; each question uses at most that many shots. Returns the shots used as "plan"."""
    lay = bench.layout
    used: list[int] = []
    subjects: dict[str, dict] = {}
    shortened = truncated = 0
    for s in bench.subjects:
        preds = []
        for q in s.questions:
            want = shots if plan is None else plan[len(used)]
            text, k = fit_prompt(encode, lay, s, q, want, context)
            shortened += k < min(shots, len(s.dev))
            pred, cut = predict(encode, logits_fn, text, sep=lay.sep, context=context)
            truncated += cut
            used.append(k)
            preds.append(pred)
            advance()
        correct = sum(p == q.answer for p, q in zip(preds, s.questions))
        subjects[s.name] = {"questions": len(preds), "correct": correct, "accuracy": correct / len(preds),
                            "predictions": "".join(preds)}
    n = sum(r["questions"] for r in subjects.values())
    c = sum(r["correct"] for r in subjects.values())
    return {"title": lay.title, "shots": shots, "questions": n, "correct": c, "accuracy": c / n,
            "macro_accuracy": sum(r["accuracy"] for r in subjects.values()) / len(subjects),
            "shortened": shortened, "truncated": truncated, "subjects": subjects, "plan": used}
