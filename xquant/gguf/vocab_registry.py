"""What every GGUF vocabulary loader shares: the `Vocab` value, token types, the loader registry and
the tokenizer-file readers.

Loader modules (vocab.py, vocab_spm_json.py) import from here and register with `@loader(name)`;
vocab.py imports them all and dispatches, so no loader module imports another.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import gguf

from ..errors import CorruptFileError, ShapeError, UnsupportedError

# gguf-py reports through `logging`; its warnings (e.g. a skipped special id) are not errors here.
logging.getLogger("gguf").setLevel(logging.ERROR)

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = (int(t) for t in (
    gguf.TokenType.NORMAL, gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL,
    gguf.TokenType.USER_DEFINED, gguf.TokenType.UNUSED, gguf.TokenType.BYTE))


@dataclass
class Vocab:
    """Everything `tokenizer.ggml.*` holds, as plain data (printed by --dry-run, written by the writer)."""

    kind: str  # loader name: "sentencepiece", "bpe"
    model: str  # tokenizer.ggml.model: "llama" (SentencePiece) or "gpt2" (byte-level BPE)
    pre: str  # tokenizer.ggml.pre
    tokens: list[bytes]
    types: list[int]
    scores: list[float] | None
    source: Path
    special: gguf.SpecialVocab | None = None
    added: int = 0  # tokens beyond the base model (added tokens)
    padded: int = 0  # "[PAD<id>]" entries up to the config's vocab_size
    add_space_prefix: bool | None = None  # tokenizer.ggml.add_space_prefix, written when known

    def __len__(self) -> int:
        return len(self.tokens)

    def add_to(self, writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        writer.add_token_types(self.types)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        if self.special is not None:
            self.special.add_to_gguf(writer, quiet=True)

    def summary(self) -> str:
        special = self.special.special_token_ids if self.special else {}
        ids = ", ".join(f"{k}={v}" for k, v in special.items())
        extra = f", {self.added} added" if self.added else ""
        extra += f", {self.padded} padding" if self.padded else ""
        return f"{self.model}/{self.pre} from {self.source.name}: {len(self)} tokens{extra}; {ids}"


Loader = Callable[[Path, int, dict[str, Any]], Vocab]
LOADERS: dict[str, Loader] = {}


def loader(name: str) -> Callable[[Loader], Loader]:
    """Register a vocabulary loader under `name` (what converters/<arch>.toml may ask for)."""

    def deco(fn: Loader) -> Loader:
        LOADERS[name] = fn
        return fn

    return deco


def read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptFileError(f"{path}: cannot read tokenizer data ({e})") from None
    return obj if isinstance(obj, dict) else {}


def too_small(model_dir: Path, n_vocab: int, needed: int, what: str) -> ShapeError:
    return ShapeError(f"{model_dir / 'config.json'}: vocab_size {n_vocab} is smaller than the tokenizer's "
                      f"{needed} tokens ({what})")


def looks_special(token: str) -> bool:
    """Tokens written like chat markers are control tokens even when not flagged special."""
    return (token.startswith("<|") and token.endswith("|>")) or \
        (token.startswith("<｜") and token.endswith("｜>")) or token in ("<pad>", "<mask>")


def added_tokens(model_dir: Path) -> dict[int, tuple[str, bool]]:
    """id -> (content, special) from added_tokens.json, tokenizer_config.json and tokenizer.json."""
    found: dict[int, tuple[str, bool]] = {}
    if (p := model_dir / "added_tokens.json").is_file():
        for content, tid in read_json(p).items():
            if isinstance(tid, int):
                found[tid] = (content, False)
    if (p := model_dir / "tokenizer_config.json").is_file():
        for tid, data in (read_json(p).get("added_tokens_decoder") or {}).items():
            if isinstance(data, dict) and "content" in data:
                found[int(tid)] = (data["content"], bool(data.get("special")))
    if (p := model_dir / "tokenizer.json").is_file():
        for data in read_json(p).get("added_tokens") or []:
            if isinstance(data, dict) and isinstance(data.get("id"), int) and "content" in data:
                found.setdefault(data["id"], (data["content"], bool(data.get("special"))))
    return found


def read_bpe_json(model_dir: Path, n_vocab: int, what: str
                  ) -> tuple[Path, dict[str, Any], dict[str, int], dict[int, tuple[str, bool]]]:
    """tokenizer.json of a BPE model: (path, the JSON, base vocab, added tokens), the vocabulary
    checked to fit in n_vocab rows."""
    path = model_dir / "tokenizer.json"
    tj = read_json(path)
    model = tj.get("model") or {}
    base: dict[str, int] = model.get("vocab") or {}
    if model.get("type") != "BPE" or not base:
        raise UnsupportedError(f"{path}: not {what} (model type {model.get('type')})")
    extra = added_tokens(model_dir)
    needed = max([*base.values(), *extra]) + 1
    if needed > n_vocab:
        raise too_small(model_dir, n_vocab, needed, path.name)
    return path, tj, base, extra
