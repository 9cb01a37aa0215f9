"""The Hugging Face tokenizer files of a LLaMA SentencePiece `tokenizer.model`, checked against sentencepiece.

transformers derives the BPE vocabulary and merges (tokenizer.json) from tokenizer.model; that needs
protobuf, and without it transformers 5 silently builds a 3-token tokenizer, so protobuf is required
up front. The text pipeline around the BPE model is then written the way SentencePiece itself
works (HF's "legacy" LLaMA layout): a normalizer that prepends one "▁" to every text (LLaMA's
add_dummy_prefix, also when the text already starts with a space) and turns each space into "▁"
(runs of spaces kept: remove_extra_whitespaces is off), no pre-tokenizer (merges run over the whole
text, as in SentencePiece), and a decoder that undoes both. transformers' own derivation instead
uses a Metaspace pre-tokenizer with prepend_scheme "first", which prepends nothing when the text
starts with a space, so " Hello" became [▁Hello] where SentencePiece gives [▁, ▁Hello].

tokenizer_config.json names `PreTrainedTokenizerFast`: transformers 5's `LlamaTokenizer` does not
read tokenizer.json's pipeline, it rebuilds that Metaspace one from the vocabulary and merges
(whatever `legacy` says), while `PreTrainedTokenizerFast` (transformers 5's `TokenizersBackend`,
and transformers 4's fast tokenizer) loads the file as written.

The derived tokenizer is then checked: same number of pieces, and the same ids as sentencepiece
itself (with BOS) on the bundled evaluation texts. BPE vocabularies with tied piece scores (e.g.
extended vocabularies whose added pieces all score 0) can encode differently, because
sentencepiece breaks ties by position and a merge list cannot; that is reported, not hidden.
Special-token text ("<s>" typed inside the text) is the one intended difference: sentencepiece
encodes it as ordinary pieces, transformers as the special id unless called with
`split_special_tokens=True` (chat templates rely on that).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..calib import BUNDLED, load_set
from ..errors import CorruptFileError, InputError, MissingDependencyError, UnsupportedError

TOKENIZER_MODEL = "tokenizer.model"
# LLaMA's special pieces (ids 0, 1, 2 of Meta's tokenizer.model).
SPECIAL_PIECES = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}
SPACE = "\u2581"  # SentencePiece's visible space
# Checked besides the bundled texts: where a tokenizer.json pipeline most often parts from
# sentencepiece (leading, repeated and trailing spaces, tabs, newlines, byte fallback).
EDGE_TEXTS = (" Hello", " ", "   Hello  world  ", "\tx\n\n  y\r\n", "数据 😀\u00e9")


def tokenizer_config(model_max_length: int) -> dict[str, Any]:
    """tokenizer_config.json of a LLaMA model converted by xquant (see the module docstring for the class)."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": True,
        "add_eos_token": False,
        **SPECIAL_PIECES,
        "pad_token": None,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
    }


def release_tokenizer_config(model_max_length: int) -> dict[str, Any]:
    """tokenizer_config.json as LLaMA releases on the Hub declare it (LlamaTokenizer, legacy off):
    what transformers derives the vocabulary and merges from, and what tests use to stand in for
    a third-party release."""
    return {**tokenizer_config(model_max_length), "tokenizer_class": "LlamaTokenizer", "legacy": False}


def sentencepiece_pipeline(tokenizer_json: dict[str, Any], add_dummy_prefix: bool = True) -> dict[str, Any]:
    """tokenizer.json with SentencePiece's text handling around its BPE model (in place; returned).

    Normalizer: Prepend("▁") when the model adds a dummy prefix, then Replace(" ", "▁"). No
    pre-tokenizer. Decoder: "▁" -> " ", <0xNN> pieces -> bytes, joined, and the dummy prefix
    stripped once from the start. Added tokens (<s>, </s>, <unk>) are matched before the normalizer
    runs, so the text after each of them gets its own "▁" prefix, as in llama.cpp and sentencepiece.
    """
    replace = {"type": "Replace", "pattern": {"String": " "}, "content": SPACE}
    prepend = [{"type": "Prepend", "prepend": SPACE}] if add_dummy_prefix else []
    tokenizer_json["normalizer"] = {"type": "Sequence", "normalizers": [*prepend, replace]}
    tokenizer_json["pre_tokenizer"] = None
    strip = [{"type": "Strip", "content": " ", "start": 1, "stop": 0}] if add_dummy_prefix else []
    tokenizer_json["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": SPACE}, "content": " "},
        {"type": "ByteFallback"}, {"type": "Fuse"}, *strip]}
    return tokenizer_json


def _adds_dummy_prefix(sp_model: bytes) -> bool:
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(sp_model)
    return proto.normalizer_spec.add_dummy_prefix


def save_hf_tokenizer(sp_model: bytes, out: Path, model_max_length: int) -> None:
    """Write tokenizer.model, tokenizer_config.json and tokenizer.json (SentencePiece's pipeline) to `out`.

    The vocabulary, merges, added tokens and BOS post-processor are what transformers derives from
    the SentencePiece model; the text pipeline is replaced by `sentencepiece_pipeline`.
    """
    from transformers import AutoTokenizer

    _require_protobuf()
    out.mkdir(parents=True, exist_ok=True)
    config_text = json.dumps(tokenizer_config(model_max_length), indent=2) + "\n"
    (out / TOKENIZER_MODEL).write_bytes(sp_model)
    # Derived through LlamaTokenizer: the class transformers knows how to build from tokenizer.model.
    (out / "tokenizer_config.json").write_text(json.dumps(release_tokenizer_config(model_max_length)) + "\n")
    AutoTokenizer.from_pretrained(out).save_pretrained(out)  # rewrites tokenizer_config.json: ours goes back below
    path = out / "tokenizer.json"
    tokenizer_json = sentencepiece_pipeline(json.loads(path.read_text(encoding="utf-8")),
                                            _adds_dummy_prefix(sp_model))
    path.write_text(json.dumps(tokenizer_json, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    (out / "tokenizer_config.json").write_text(config_text)


def unreachable_pieces(sp_model: bytes) -> list[str]:
    """Pieces a merge list cannot build: they contain a character that is not a piece itself.

    sentencepiece starts from characters, known or not, and merges any pair whose concatenation is
    a piece; transformers' BPE byte-falls-back a character outside the vocabulary before merging,
    so such a piece (e.g. one appended by vocabulary expansion without its characters) is never
    produced there. Text using it encodes differently; this lists them so the plan can say so.
    """
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=sp_model)
    ids = range(sp.get_piece_size())
    pieces = {sp.id_to_piece(i) for i in ids}
    normal = (sp.id_to_piece(i) for i in ids
              if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i)))
    return [p for p in normal if len(p) > 1 and any(c not in pieces for c in p)]


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
        want = SPECIAL_PIECES[f"{role}_token"]
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

    The files are built in a temporary directory by save_hf_tokenizer (the project's one recipe for
    a LLaMA tokenizer) and read back, so nothing is written next to the output before the plan
    executes.
    """
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="xquant-tok-") as tmp:
        folder = Path(tmp) / "tokenizer"
        save_hf_tokenizer(sp.path.read_bytes(), folder, model_max_length)
        tok = AutoTokenizer.from_pretrained(folder)
        if len(tok) != sp.pieces:
            raise CorruptFileError(f"{sp.path}: transformers built a tokenizer of {len(tok)} tokens from "
                                   f"{sp.pieces} pieces")
        docs = probe_documents()
        bad = compare_ids(tok, sp.path, docs) + compare_ids(tok, sp.path, list(EDGE_TEXTS))
        files = {p.name: json.loads(p.read_text(encoding="utf-8")) for p in sorted(folder.glob("*.json"))}
    unreachable = unreachable_pieces(sp.path.read_bytes())
    if unreachable:
        check = (f"{len(unreachable)} pieces of tokenizer.model (e.g. {unreachable[0]!r}) contain characters that are "
                 "not pieces themselves: transformers' BPE cannot produce them, sentencepiece can, so text using "
                 "them encodes differently; sentencepiece with tokenizer.model gives the reference ids")
        if bad:
            check += f" ({bad} of the checked texts differ)"
    elif bad:
        check = (f"tokenizer.json encodes {bad} of {len(docs)} bundled eval documents and {len(EDGE_TEXTS)} "
                 "edge-case texts differently from "
                 "sentencepiece (tied piece scores?); sentencepiece with tokenizer.model gives the reference ids")
    else:
        check = (f"tokenizer.json ids equal sentencepiece's (BOS {sp.bos}) on all {len(docs)} bundled eval documents "
                 f"and {len(EDGE_TEXTS)} edge-case texts")
    return files, check, bad == 0 and not unreachable
