"""SentencePiece-style BPE from tokenizer.json alone -> a llama.cpp SentencePiece ("llama") vocabulary.

XVERSE ships no tokenizer.model: its tokenizer.json is a BPE model with SentencePiece pieces ("▁"
for spaces) and byte-fallback tokens `<0x00>`..`<0xFF>`. llama.cpp's converter (XverseModel) writes
it as `tokenizer.ggml.model = "llama"`, `pre = "default"`, tokens by id, and types: byte for
`<0xNN>`, control for special added tokens, user-defined for other added tokens, normal otherwise.

Two deliberate additions to what that converter writes, both standard `tokenizer.ggml.*` keys:
- scores. Without them llama.cpp's SentencePiece tokenizer sees every score as 0 and merges
  left-to-right instead of in BPE's order, so its ids drift from transformers'. A token made by
  merge number r gets score -r (SentencePiece's own BPE convention: earlier merge, higher score);
  tokens no merge produces (characters, bytes, specials) score below every merge.
- add_space_prefix, from the tokenizer.json's Metaspace / Prepend("▁") setting, so a tokenizer
  that does not prefix a space is not given one by llama.cpp's default.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import gguf

from ..errors import UnsupportedError
from .vocab_registry import BYTE, CONTROL, NORMAL, UNUSED, USER_DEFINED, Vocab, loader, looks_special, read_bpe_json

_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def merge_scores(vocab: dict[str, int], merges: list[Any]) -> dict[int, float]:
    """id -> -rank of the first merge producing it; other tokens -(merges + id)."""
    scores = {tid: -float(len(merges) + tid) for tid in vocab.values()}
    for rank in range(len(merges) - 1, -1, -1):  # backwards: the first (best) merge wins
        pair = merges[rank]
        left, right = pair.split(" ", 1) if isinstance(pair, str) else pair
        tid = vocab.get(left + right)
        if tid is not None:
            scores[tid] = -float(rank)
    return scores


def space_prefix(tokenizer_json: dict[str, Any]) -> bool:
    """Whether the tokenizer prepends "▁" to the text (Metaspace prepend scheme, or a Prepend normalizer)."""
    def steps(node: Any) -> list[dict[str, Any]]:
        if not isinstance(node, dict):
            return []
        inner = node.get("pretokenizers") or node.get("normalizers")
        return [s for n in inner for s in steps(n)] if inner else [node]

    for step in steps(tokenizer_json.get("normalizer")) + steps(tokenizer_json.get("pre_tokenizer")):
        if step.get("type") == "Prepend" and step.get("prepend") == "\u2581":
            return True
        if step.get("type") == "Metaspace":
            scheme = step.get("prepend_scheme")
            return scheme in ("first", "always") if scheme else bool(step.get("add_prefix_space", True))
    return False


@loader("sentencepiece-json")
def sentencepiece_json_vocab(model_dir: Path, n_vocab: int, config: dict[str, Any]) -> Vocab:
    """A SentencePiece-style BPE tokenizer.json (XVERSE): tokens, types, merge-order scores."""
    path, tj, base, extra = read_bpe_json(model_dir, n_vocab, "a SentencePiece-style BPE tokenizer")
    model = tj["model"]
    tokens = [f"[PAD{i}]".encode() for i in range(n_vocab)]
    types = [UNUSED] * n_vocab
    scores = [-10000.0] * n_vocab
    for tid, score in merge_scores(base, model.get("merges") or []).items():
        scores[tid] = score
    for text, tid in base.items():
        tokens[tid] = text.encode("utf-8")
        types[tid] = BYTE if _BYTE_TOKEN.fullmatch(text) else NORMAL
    ids = set(base.values())
    for tid, (content, special) in extra.items():
        tokens[tid] = content.encode("utf-8")
        types[tid] = CONTROL if special or looks_special(content) else USER_DEFINED
        if tid not in ids:
            scores[tid] = -1000.0  # as llama.cpp's converter scores added tokens
    n_bytes = sum(1 for t in types if t == BYTE)
    if n_bytes and n_bytes != 256:
        raise UnsupportedError(f"{path}: {n_bytes} byte-fallback tokens <0xNN>, expected all 256")
    return Vocab("sentencepiece-json", "llama", "default", tokens, types, scores, path,
                 gguf.SpecialVocab(model_dir, n_vocab=n_vocab), added=len(set(extra) - ids),
                 padded=n_vocab - len(ids | set(extra)), add_space_prefix=space_prefix(tj))
