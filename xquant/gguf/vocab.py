"""Tokenizers -> GGUF vocabulary (`tokenizer.ggml.*`), as llama.cpp's converter lays them out.

One loader per tokenizer kind, in a registry: `sentencepiece` (LLaMA's tokenizer.model, including
expanded vocabularies: Chinese-LLaMA / Ziya / Colossal merged pieces, added tokens beyond the
SentencePiece model, and padding up to the config's vocab_size) and `bpe` (byte-level BPE from
tokenizer.json, with the pre-tokenizer name llama.cpp needs); `sentencepiece-json` (in
vocab_spm_json.py: SentencePiece-style BPE shipped as tokenizer.json only, e.g. XVERSE). An
architecture may name its loader in converters/<arch>.toml (`[gguf] vocab = "..."`), else the
files decide. The registry, the `Vocab` value and the readers loaders share live in
vocab_registry.py, which every loader module imports (none imports another).

Facts followed (llama.cpp convert_hf_to_gguf.py, gguf-py, llama-vocab.cpp):
- token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte;
- SentencePiece ids without a piece become "[PAD<id>]", score -10000, unused; added tokens get
  score -1000 and are control when special, else user-defined (with "▁" written as a space);
- special ids / add_bos / add_eos / chat template come from tokenizer_config.json, tokenizer.json
  and config.json (gguf-py's SpecialVocab reads them the way the converter does).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import gguf

from ..errors import CorruptFileError, InputError, ShapeError, UnsupportedError
from . import vocab_spm_json  # noqa: F401  (registers "sentencepiece-json")
from .vocab_registry import (BYTE, CONTROL, LOADERS, NORMAL, UNKNOWN, UNUSED, USER_DEFINED, Vocab, added_tokens,
                             loader, looks_special, read_bpe_json, read_json, too_small)

__all__ = ["BYTE", "CONTROL", "NORMAL", "UNKNOWN", "UNUSED", "USER_DEFINED", "Vocab", "added_tokens",
           "bpe_pre_name", "known", "load_vocab", "loader", "read_bpe_json"]


def load_vocab(model_dir: Path, config: dict[str, Any], kind: str | None = None) -> Vocab:
    """The GGUF vocabulary of a model directory; config's vocab_size is the vocabulary's size."""
    n_vocab = config.get("vocab_size")
    if not isinstance(n_vocab, int) or n_vocab <= 0:
        raise InputError(f"{model_dir / 'config.json'}: no valid vocab_size")
    kind = kind or _detect(model_dir)
    try:
        load = LOADERS[kind]
    except KeyError:
        raise UnsupportedError(f"unknown tokenizer kind '{kind}' (known: {', '.join(known())})") from None
    vocab = load(model_dir, n_vocab, config)
    if len(vocab) != n_vocab:  # loaders pad or fail; this guards the invariant
        raise ShapeError(f"{vocab.source}: built {len(vocab)} tokens for vocab_size {n_vocab}")
    return vocab


def _detect(model_dir: Path) -> str:
    if (model_dir / "tokenizer.model").is_file():
        return "sentencepiece"
    tj = model_dir / "tokenizer.json"
    if tj.is_file():
        model = read_json(tj).get("model", {})
        if model.get("type") == "BPE" and not model.get("byte_fallback", False):
            return "bpe"
        if model.get("type") == "BPE" and _metaspace(read_json(tj)):
            return "sentencepiece-json"  # SentencePiece-style BPE released as tokenizer.json only
        raise UnsupportedError(f"{tj}: a {model.get('type')} tokenizer"
                               f"{' with byte fallback' if model.get('byte_fallback') else ''} needs its "
                               f"tokenizer.model (SentencePiece) beside it")
    raise InputError(f"{model_dir}: tokenizer files missing (need tokenizer.model or tokenizer.json)")


@loader("sentencepiece")
def sentencepiece_vocab(model_dir: Path, n_vocab: int, config: dict[str, Any]) -> Vocab:
    """LLaMA's SentencePiece vocabulary, expanded by added tokens and padded to n_vocab."""
    from sentencepiece import SentencePieceProcessor

    path = model_dir / "tokenizer.model"
    sp = SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(path))
    except (OSError, RuntimeError) as e:
        raise CorruptFileError(f"{path}: not a SentencePiece model ({str(e).splitlines()[0] if str(e) else e})") from None
    n_sp = sp.vocab_size()
    if n_sp > n_vocab:
        raise too_small(model_dir, n_vocab, n_sp, path.name)
    tokens = [f"[PAD{i}]".encode() for i in range(n_vocab)]
    scores = [-10000.0] * n_vocab
    types = [UNUSED] * n_vocab
    for i in range(n_sp):
        tokens[i] = sp.IdToPiece(i).encode("utf-8")
        scores[i] = sp.GetScore(i)
        types[i] = (UNKNOWN if sp.IsUnknown(i) else CONTROL if sp.IsControl(i) else
                    UNUSED if sp.IsUnused(i) else BYTE if sp.IsByte(i) else NORMAL)
    extra = added_tokens(model_dir)
    if extra and max(extra) >= n_vocab:
        raise too_small(model_dir, n_vocab, max(extra) + 1, f"added token '{extra[max(extra)][0]}'")
    n_added = 0
    for tid, (content, special) in sorted(extra.items()):
        if tid < n_sp and tokens[tid] == content.encode("utf-8"):
            continue  # the SentencePiece piece itself (<unk>, <s>, </s>): keep its own type and score
        n_added += tid >= n_sp
        if special or looks_special(content):
            types[tid] = CONTROL
        else:
            types[tid] = USER_DEFINED
            content = content.replace("\u2581", " ")  # llama.cpp matches user-defined text with spaces
        tokens[tid] = content.encode("utf-8")
        scores[tid] = -1000.0
    padded = sum(1 for t in types[n_sp:] if t == UNUSED)
    return Vocab("sentencepiece", "llama", "default", tokens, types, scores, path,
                 gguf.SpecialVocab(model_dir, n_vocab=n_vocab), added=n_added, padded=padded)


# ---------------------------------------------------------------- byte-level BPE

# llama.cpp selects its pre-tokenizer (the regex splitting text before BPE) by name. The name
# follows from the pre-tokenizer the tokenizer.json declares; each entry is the Split regex (or
# the plain ByteLevel one) that a llama.cpp pre-tokenizer type implements.
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
BPE_PRE_TOKENIZERS: dict[str, str] = {
    GPT2_REGEX: "gpt-2",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",
}


def bpe_pre_name(tokenizer_json: dict[str, Any], source: Path) -> str:
    """The llama.cpp pre-tokenizer type for a byte-level BPE tokenizer.json."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    regexes = []
    for step in steps:
        if step.get("type") == "Split":
            pattern = step.get("pattern", {})
            regexes.append(pattern.get("Regex") or re.escape(pattern.get("String", "")))
        elif step.get("type") == "ByteLevel" and step.get("use_regex", True):
            regexes.append(GPT2_REGEX)
        elif step.get("type") not in ("ByteLevel", "Digits"):
            regexes.append(f"<{step.get('type')}>")
    if len(regexes) == 1 and regexes[0] in BPE_PRE_TOKENIZERS:
        return BPE_PRE_TOKENIZERS[regexes[0]]
    raise UnsupportedError(f"{source}: pre-tokenizer {regexes or [pre.get('type')]} has no llama.cpp "
                           f"equivalent known to xquant (known: {', '.join(sorted(set(BPE_PRE_TOKENIZERS.values())))})")


@loader("bpe")
def bpe_vocab(model_dir: Path, n_vocab: int, config: dict[str, Any]) -> Vocab:
    """A byte-level BPE tokenizer.json (GPT-2 style): tokens by id, merges, pre-tokenizer type."""
    path, tj, base, extra = read_bpe_json(model_dir, n_vocab, "a byte-level BPE tokenizer")
    pre = bpe_pre_name(tj, path)
    tokens = [f"[PAD{i}]".encode() for i in range(n_vocab)]
    types = [UNUSED] * n_vocab
    for text, tid in base.items():
        tokens[tid], types[tid] = text.encode("utf-8"), NORMAL
    for tid, (content, special) in extra.items():
        tokens[tid] = content.encode("utf-8")
        types[tid] = CONTROL if special or looks_special(content) else USER_DEFINED
    padded = n_vocab - len(set(base.values()) | set(extra))
    return Vocab("bpe", "gpt2", pre, tokens, types, None, path,
                 gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=n_vocab),
                 added=len(set(extra) - set(base.values())), padded=padded)


def _metaspace(tokenizer_json: dict[str, Any]) -> bool:
    """Whether a tokenizer.json marks spaces SentencePiece's way ("▁"), by pre-tokenizer or normalizer."""
    return "\u2581" in json.dumps([tokenizer_json.get("pre_tokenizer"), tokenizer_json.get("normalizer")],
                                   ensure_ascii=False)


def known() -> list[str]:
    """The registered loader names."""
    return sorted(LOADERS)

