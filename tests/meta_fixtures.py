"""Fixtures for the Meta -> HF tests: a multi-head (no GQA) bfloat16 model with a > 32,000 vocabulary.

The tiny trained model covers grouped-query attention in float32. This second model covers the
other LLaMA-1/Llama-2 shapes: every head its own kv head, bfloat16 weights (as Meta ships), and a
tokenizer extended past 32,000 pieces the way Chinese LLaMA derivatives extend theirs (pieces
appended to LLaMA's SentencePiece model), with pieces that real text uses at ids >= 32,000.
Random weights are enough: the checks are exact tensor and logit equality.
"""

from __future__ import annotations

import collections
from pathlib import Path

from xquant.demo import tiny

EXTENDED_VOCAB = 32256  # > 32,000 and divisible by the 4 model-parallel shards
APPENDED = 256  # corpus-derived pieces placed last: ids 32,000 .. 32,255


def _proto(sp_model: bytes):
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    m.ParseFromString(sp_model)
    return m


def extended_sentencepiece(base: bytes, size: int = EXTENDED_VOCAB, appended: int = APPENDED) -> bytes:
    """`base` grown to `size` pieces: filler pieces, then the commonest adjacent piece pairs of the
    corpus (so encoding real text uses the last ids). Scores strictly decrease, as a trainer's do."""
    import sentencepiece as spm

    m = _proto(base)
    have = {p.piece for p in m.pieces}
    sp = spm.SentencePieceProcessor(model_proto=base)
    pairs: collections.Counter[str] = collections.Counter()
    for line in tiny.corpus_lines():
        pieces = sp.encode(line, out_type=str)
        for a, b in zip(pieces, pieces[1:], strict=False):
            if not (a.startswith("<0x") or b.startswith("<0x") or b.startswith("\u2581")):
                pairs[a + b] += 1
    new = [s for s, c in pairs.most_common() if s not in have and c >= 2][:appended]
    filler: list[str] = []
    k = 0
    while len(m.pieces) + len(filler) + len(new) < size:
        s = "\u2581" + chr(0x4E00 + k // 200) + chr(0x9000 + k % 200) + "\u4e28"
        k += 1
        if s not in have:
            filler.append(s)
    score = min(p.score for p in m.pieces)
    for s in filler + new:
        score -= 1.0
        piece = m.pieces.add()
        piece.piece, piece.score, piece.type = s, score, 1  # NORMAL
    assert len(m.pieces) == size
    return m.SerializeToString()


def tied_score_sentencepiece(base: bytes) -> bytes:
    """`base` with its multi-character merges all scored 0: ties a merge list cannot order like
    sentencepiece does (what vocabulary-merging scripts that append pieces at score 0 produce)."""
    m = _proto(base)
    for p in m.pieces:
        if p.type == 1 and len(p.piece) > 1 and not p.piece.startswith("\u2581"):
            p.score = 0.0
    return m.SerializeToString()


def mha_model_dir() -> Path:
    """A random bfloat16 LLaMA: 2 layers, 8 heads = 8 kv heads, extended tokenizer; built once."""

    def build(tmp: Path) -> None:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        base = (tiny.tokenizer_dir() / "tokenizer.model").read_bytes()
        tiny.save_hf_tokenizer(extended_sentencepiece(base), tmp)
        config = LlamaConfig(
            vocab_size=EXTENDED_VOCAB, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
            num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512,
            rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
            bos_token_id=1, eos_token_id=2, pad_token_id=None, architectures=["LlamaForCausalLM"],
        )
        torch.manual_seed(7)
        model = LlamaForCausalLM(config).to(torch.bfloat16)
        model.save_pretrained(tmp)

    return tiny._cached("llama-mha", tiny.cache_key(tiny.SPEC, "meta-mha-32256-v1"), build)
