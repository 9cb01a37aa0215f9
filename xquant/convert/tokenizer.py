"""The Hugging Face tokenizer files of a LLaMA SentencePiece `tokenizer.model`, checked against sentencepiece.

transformers derives the fast tokenizer (tokenizer.json) from tokenizer.model; that needs protobuf,
and without it transformers 5 silently builds a 3-token tokenizer, so protobuf is required up front.
The derived tokenizer is then checked: same number of pieces, and the same ids as sentencepiece
itself (with BOS) on the bundled evaluation texts. BPE vocabularies with tied piece scores (e.g.
extended vocabularies whose added pieces all score 0) can encode differently, because
sentencepiece breaks ties by position and a merge list cannot; that is reported, not hidden.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..calib import BUNDLED, load_set
from ..errors import CorruptFileError, InputError, MissingDependencyError, UnsupportedError
from ..tiny import TOKENIZER_CONFIG, save_hf_tokenizer

TOKENIZER_MODEL = "tokenizer.model"


def find_tokenizer(src: Path) -> Path:
    """tokenizer.model beside the shards (Llama-2) or one level up (the LLaMA-1 release layout)."""
    for folder in (src, src.parent):
        if (folder / TOKENIZER_MODEL).is_file():
            return folder / TOKENIZER_MODEL
    raise InputError(f"{src}: no {TOKENIZER_MODEL} here or in {src.parent} (Meta ships it with the weights)")


@dataclass(frozen=True)
class SentencePieceInfo:
    path: Path
    pieces: int
    bos: int
    eos: int


def read_sentencepiece(path: Path) -> SentencePieceInfo:
    """Open tokenizer.model with sentencepiece and check it has LLaMA's special pieces."""
    import sentencepiece as spm

    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CorruptFileError(f"{path}: not a SentencePiece model ({first}); "
                               "Llama-3 tiktoken tokenizers are not supported") from None
    for role, token_id in (("bos", sp.bos_id()), ("eos", sp.eos_id()), ("unk", sp.unk_id())):
        want = TOKENIZER_CONFIG[f"{role}_token"]
        got = sp.id_to_piece(token_id) if token_id >= 0 else None
        if got != want:
            raise UnsupportedError(f"{path}: {role} piece is {got!r}, LLaMA's is {want!r}")
    return SentencePieceInfo(path, sp.get_piece_size(), sp.bos_id(), sp.eos_id())


def _require_protobuf() -> None:
    try:
        import google.protobuf  # noqa: F401
    except ImportError:
        raise MissingDependencyError("protobuf", "building the fast tokenizer from tokenizer.model") from None


def probe_documents() -> list[str]:
    """The bundled evaluation texts (zh, en, code): what the id check encodes."""
    return [doc for name in BUNDLED for doc in load_set(name, "eval").documents]


def compare_ids(tokenizer, sp_path: Path, documents: list[str]) -> int:
    """How many documents the HF tokenizer encodes differently from sentencepiece (with BOS)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_path))
    bad = 0
    for doc in documents:
        if tokenizer(doc, verbose=False)["input_ids"] != [sp.bos_id(), *sp.encode(doc)]:
            bad += 1
    return bad


def hf_tokenizer_files(sp: SentencePieceInfo, model_max_length: int) -> tuple[dict[str, dict[str, Any]], str, bool]:
    """({file name: JSON object}, one-line check result, ids equal) for tokenizer.json + tokenizer_config.json.

    The files are built in a temporary directory by tiny.save_hf_tokenizer (the project's one
    recipe for a LLaMA tokenizer_config + derived tokenizer.json) and read back, so nothing is
    written next to the output before the plan executes.
    """
    from transformers import AutoTokenizer

    _require_protobuf()
    with tempfile.TemporaryDirectory(prefix="xquant-tok-") as tmp:
        folder = Path(tmp) / "tokenizer"
        save_hf_tokenizer(sp.path.read_bytes(), folder)
        tok = AutoTokenizer.from_pretrained(folder)
        if len(tok) != sp.pieces:
            raise CorruptFileError(f"{sp.path}: transformers built a tokenizer of {len(tok)} tokens from "
                                   f"{sp.pieces} pieces")
        docs = probe_documents()
        bad = compare_ids(tok, sp.path, docs)
        files = {p.name: json.loads(p.read_text(encoding="utf-8")) for p in sorted(folder.glob("*.json"))}
    files["tokenizer_config.json"]["model_max_length"] = model_max_length
    if bad:
        check = (f"tokenizer.json encodes {bad} of {len(docs)} bundled eval documents differently from "
                 "sentencepiece (tied piece scores?); sentencepiece with tokenizer.model gives the reference ids")
    else:
        check = f"tokenizer.json ids equal sentencepiece's (BOS {sp.bos}) on all {len(docs)} bundled eval documents"
    return files, check, bad == 0
