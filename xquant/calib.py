"""Calibration and evaluation text: bundled sets, user files, deterministic sampling.

Bundled sets live in calibration/<set>/{calib,eval}/ as one document per file, written by this
project. `mixed` is the union of zh, en and code. A user may instead name a .txt file (one
document), a directory of .txt files, or a .jsonl file with a "text" field per line.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

from .errors import CorruptFileError, InputError
from .paths import data_dir

BUNDLED = ("zh", "en", "code")
DATASET_PREFIX = "hf:"
SPLITS = ("calib", "eval")


def bundled_names() -> list[str]:
    return [*BUNDLED, "mixed"]


@dataclass(frozen=True)
class TextSet:
    """A named list of documents."""

    name: str
    documents: tuple[str, ...]

    @property
    def text(self) -> str:
        return "\n\n".join(self.documents)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for d in self.documents:
            h.update(hashlib.sha256(d.encode()).digest())
        return h.hexdigest()


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CorruptFileError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None


def _bundled(name: str, split: str) -> list[str]:
    folder = data_dir("calibration") / name / split
    files = sorted(p for p in folder.glob("*") if p.is_file())
    if not files:
        raise InputError(f"{folder}: bundled set '{name}' has no {split} documents")
    return [_read_text(p) for p in files]


def load_set(spec: str, split: str = "calib") -> TextSet:
    """A bundled set by name ('zh', 'en', 'code', 'mixed') or a user file/directory by path."""
    if split not in SPLITS:
        raise InputError(f"unknown split '{split}' (known: {', '.join(SPLITS)})")
    if spec in BUNDLED:
        return TextSet(f"{spec}.{split}", tuple(_bundled(spec, split)))
    if spec == "mixed":
        docs = [d for name in BUNDLED for d in _bundled(name, split)]
        return TextSet(f"mixed.{split}", tuple(docs))
    if spec.startswith(DATASET_PREFIX):
        return _dataset(spec[len(DATASET_PREFIX):])
    path = Path(spec).expanduser()
    if not path.exists():
        raise InputError(f"{spec}: neither a bundled set ({', '.join(bundled_names())}) nor an existing file")
    if path.is_dir():
        docs = [_read_text(p) for p in sorted(path.glob("*.txt"))]
    elif path.suffix == ".jsonl":
        docs = []
        for n, line in enumerate(_read_text(path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                docs.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise CorruptFileError(f"{path}:{n}: expected a JSON object with a \"text\" field") from None
    else:
        docs = [_read_text(path)]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise InputError(f"{path}: no text in it")
    return TextSet(path.name, tuple(docs))


def sample_windows(token_ids: list[int], n: int, seq_len: int, seed: int, source: str = "calibration"
                   ) -> list[list[int]]:
    """n windows of exactly seq_len tokens, drawn deterministically from a token stream.

    With enough text the windows do not overlap; with less they are drawn at random offsets
    (overlap is then unavoidable). Text shorter than one window is an error, not padding.
    """
    if len(token_ids) < seq_len:
        raise InputError(f"{source}: {len(token_ids)} tokens, fewer than one sequence of {seq_len} "
                         f"(use a shorter --seq-len or more text)")
    rng = random.Random(seed)
    slots = len(token_ids) // seq_len
    if slots >= n:
        starts = [i * seq_len for i in sorted(rng.sample(range(slots), n))]
    else:
        starts = [rng.randrange(0, len(token_ids) - seq_len + 1) for _ in range(n)]
    return [token_ids[s: s + seq_len] for s in starts]


def _dataset(ref: str) -> TextSet:
    """A `datasets` dataset: 'hf:NAME[@SPLIT][#COLUMN]' (hub name, local script, or a directory
    written by `Dataset.save_to_disk`). Hub names need the network; the split defaults to 'train'
    and the column to 'text'."""
    try:
        import datasets
    except ImportError:
        from .errors import MissingDependencyError

        raise MissingDependencyError("datasets", "calibration from a dataset") from None
    column = "text"
    if "#" in ref:
        ref, column = ref.rsplit("#", 1)
    split = "train"
    if "@" in ref:
        ref, split = ref.rsplit("@", 1)
    try:
        if Path(ref).is_dir() and (Path(ref) / "dataset_info.json").exists():
            ds = datasets.load_from_disk(ref)
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[split]
        else:
            ds = datasets.load_dataset(ref, split=split)
    except (OSError, ValueError, KeyError, ConnectionError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"{DATASET_PREFIX}{ref}: cannot load the dataset ({first})") from None
    if column not in ds.column_names:
        raise InputError(f"{DATASET_PREFIX}{ref}: no column '{column}' (columns: {', '.join(ds.column_names)}); "
                         f"name one with #COLUMN")
    docs = tuple(t for t in ds[column] if isinstance(t, str) and t.strip())
    if not docs:
        raise InputError(f"{DATASET_PREFIX}{ref}: column '{column}' holds no text")
    return TextSet(f"{ref}@{split}#{column}", docs)
