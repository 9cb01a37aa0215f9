"""A tiny "derivative" with an expanded vocabulary: the Ziya situation in miniature.

Ziya-LLaMA-13B took LLaMA-13B as published (float16), appended ~7,400 Chinese pieces to its
SentencePiece model, resized the embedding and output rows, trained further and published its
weights in float16. This module does the same to the tiny model in seconds:

1. the tiny model's weights rounded to float16 (the base "as published": `xquant convert
   --dtype float16` of the tiny model gives exactly these values);
2. pieces from a SentencePiece model trained on the Chinese texts alone are appended to the tiny
   tokenizer's model proto, so every existing token keeps its id (as Chinese-LLaMA and Ziya did);
3. `resize_token_embeddings` adds rows for them, and a few dozen training steps follow;
4. the result is saved in float16 with its tokenizer.

Cached like the tiny model (`tiny._cached`); the tests and the demo use it.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from . import tiny
from ..console import info


@dataclass(frozen=True)
class DerivativeSpec:
    new_tokens: int = 256  # pieces appended to the tokenizer (2,000 -> 2,256)
    zh_vocab: int = 2600  # vocabulary of the Chinese-only model the pieces come from
    steps: int = 32
    batch: int = 8  # half the tiny model's batch: the build stays well under 30 s on two busy cores
    lr: float = 1e-3
    seed: int = 4321


DERIVATIVE = DerivativeSpec()


def expand_sentencepiece(base_model: bytes, extra_model: bytes, count: int) -> tuple[bytes, list[str]]:
    """Append up to `count` pieces of `extra_model` that `base_model` lacks; returns (model, new pieces).

    Appending keeps every existing id. New pieces are scored below all existing ones so that the
    original merges keep their priority: text without the new words tokenizes as before.
    Single characters are skipped (byte fallback already covers them).
    """
    from sentencepiece import sentencepiece_model_pb2 as pb

    base, extra = pb.ModelProto(), pb.ModelProto()
    base.ParseFromString(base_model)
    extra.ParseFromString(extra_model)
    have = {p.piece for p in base.pieces}
    lowest = min(p.score for p in base.pieces)
    added: list[str] = []
    for p in extra.pieces:  # BPE pieces are stored in merge order: components come first
        if len(added) == count:
            break
        if p.type != pb.ModelProto.SentencePiece.NORMAL or p.piece in have:
            continue
        if len(p.piece.replace("\u2581", "")) < 2:
            continue
        new = base.pieces.add()
        new.piece, new.score, new.type = p.piece, lowest - 1 - len(added), pb.ModelProto.SentencePiece.NORMAL
        have.add(p.piece)
        added.append(p.piece)
    return base.SerializeToString(), added


def derivative_dir(spec: tiny.TinySpec = tiny.SPEC, dspec: DerivativeSpec = DERIVATIVE) -> Path:
    """The tiny derivative (float16 HF directory with its expanded tokenizer), built once (≈15 s).

    Its base is the tiny model in float16: `xquant convert TINY OUT --dtype float16`.
    """
    base_dir = tiny.model_dir(spec)
    key = tiny.cache_key(spec, "derivative:" + json.dumps(asdict(dspec), sort_keys=True))

    def build(tmp: Path) -> None:
        import torch
        from transformers import LlamaForCausalLM

        zh_lines = [line for doc in tiny.load_set("zh", "calib").documents
                    for line in doc.splitlines() if line.strip()]
        sp, added = expand_sentencepiece((base_dir / "tokenizer.model").read_bytes(),
                                         tiny.train_sentencepiece(zh_lines, dspec.zh_vocab), dspec.new_tokens)
        tiny.save_hf_tokenizer(sp, tmp)
        tokenizer = tiny.load_tokenizer(tmp)
        ids = tiny.encode_set(tokenizer, "mixed", "calib")

        torch.manual_seed(dspec.seed)
        model = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        with torch.no_grad():  # start from the float16 base, as a real derivative starts from the release
            for p in model.parameters():
                p.copy_(p.half().float())
        old_vocab = model.config.vocab_size
        model.resize_token_embeddings(len(tokenizer))
        t0, c0 = time.time(), time.process_time()
        info(f"training the tiny derivative: vocabulary {old_vocab} -> {len(tokenizer)}, {dspec.steps} steps")
        threads = torch.get_num_threads()
        # One thread: the same result on every machine, and on a busy shared machine several times
        # faster than threads waiting for each other at every tiny matmul.
        torch.set_num_threads(1)
        try:
            loss = tiny.train(model, ids, replace(spec, batch=dspec.batch), dspec.steps, dspec.lr, dspec.seed)
        finally:
            torch.set_num_threads(threads)
        model.to(torch.float16).save_pretrained(tmp)
        (tmp / "xquant-tiny.json").write_text(json.dumps({
            "derivative_of": base_dir.name, "base_dtype": "float16", "spec": asdict(dspec),
            "vocab": [old_vocab, len(tokenizer)], "added_pieces": added,
            "final_train_loss": loss, "train_seconds": round(time.time() - t0, 1),
            "train_cpu_seconds": round(time.process_time() - c0, 1),
        }, indent=2, ensure_ascii=False) + "\n")

    return tiny._cached("derivative", key, build)
