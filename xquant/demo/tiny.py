"""Tiny real models built offline from the bundled corpus: tokenizer and a briefly trained LLaMA.

Used by the tests, the demo and the benchmarks. Everything is deterministic and cached under
`cache_dir()/tiny/<key>`, where the key hashes the corpus, the spec, BUILD_VERSION and the library
versions, so a change to any of them rebuilds. A lock makes concurrent builders wait for one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from ..calib import BUNDLED, load_set
from ..console import info
from ..convert.tokenizer import save_hf_tokenizer as write_hf_tokenizer
from ..convert.tokenizer import release_tokenizer_config
from ..paths import cache_dir, data_dir


@dataclass(frozen=True)
class TinySpec:
    """Shapes chosen so every quantizer applies: rows are multiples of 256 (llama.cpp k-quants),
    in-features divide group sizes 32 and 128, and attention is grouped-query (8 heads, 2 kv)."""

    vocab_size: int = 2000
    hidden_size: int = 256
    intermediate_size: int = 768
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 2
    context: int = 512
    train_seq_len: int = 128
    batch: int = 16
    steps: int = 240
    lr: float = 3e-3
    seed: int = 1234


SPEC = TinySpec()
# Part of the cache key: bump it whenever the way a fixture is built changes (not for edits that
# leave the built files the same), so that every cache rebuilds.
BUILD_VERSION = 2  # 2: tokenizer.json with the SentencePiece normalizer (issue 15)


def _corpus_files() -> list[Path]:
    root = data_dir("calibration")
    return sorted(p for name in BUNDLED for p in (root / name).rglob("*") if p.is_file())


def cache_key(spec: TinySpec, what: str) -> str:
    import sentencepiece
    import torch
    import transformers

    h = hashlib.sha256()
    h.update(what.encode())
    h.update(json.dumps(asdict(spec), sort_keys=True).encode())
    h.update(str(BUILD_VERSION).encode())
    h.update(f"{torch.__version__}|{transformers.__version__}|{sentencepiece.__version__}".encode())
    for p in _corpus_files():
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _cached(name: str, key: str, build) -> Path:
    """cache_dir()/tiny/<name>-<key>, built by build(tmp_dir) once, atomically."""
    root = cache_dir() / "tiny"
    target = root / f"{name}-{key}"
    if target.exists():
        return target
    with _locked(root / f".{name}-{key}.lock"):
        if target.exists():
            return target
        tmp = root / f".{name}-{key}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        build(tmp)
        os.replace(tmp, target)
    return target


# ---------------------------------------------------------------- tokenizer

# A LLaMA release's tokenizer_config.json (LlamaTokenizer), with the tiny context: what tests use to
# lay out third-party releases. save_hf_tokenizer writes xquant's own (PreTrainedTokenizerFast).
TOKENIZER_CONFIG = release_tokenizer_config(SPEC.context)


def train_sentencepiece(lines: list[str], vocab_size: int, user_symbols: list[str] | None = None) -> bytes:
    """A LLaMA-style SentencePiece BPE model (byte fallback, digits split, no normalisation)."""
    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=out,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        split_digits=True,
        character_coverage=0.995,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        allow_whitespace_only_pieces=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        user_defined_symbols=user_symbols or [],
        input_sentence_size=0,
        shuffle_input_sentence=False,
        max_sentence_length=1 << 16,
        num_threads=1,  # deterministic
        minloglevel=2,
    )
    return out.getvalue()


def save_hf_tokenizer(sp_model: bytes, out: Path) -> None:
    """tokenizer.model, tokenizer_config.json and tokenizer.json, as `xquant convert` writes them."""
    write_hf_tokenizer(sp_model, out, SPEC.context)


def corpus_lines(split: str = "calib") -> list[str]:
    return [line for name in BUNDLED for doc in load_set(name, split).documents
            for line in doc.splitlines() if line.strip()]


def tokenizer_dir(spec: TinySpec = SPEC) -> Path:
    """The tiny LLaMA tokenizer (vocab = spec.vocab_size), built once."""

    def build(tmp: Path) -> None:
        info("building the tiny tokenizer (sentencepiece BPE)")
        save_hf_tokenizer(train_sentencepiece(corpus_lines(), spec.vocab_size), tmp)

    return _cached("tokenizer", cache_key(spec, "tokenizer"), build)


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def encode_set(tokenizer, name: str, split: str) -> list[int]:
    """All documents of a set as one id stream, each document starting with BOS."""
    ids: list[int] = []
    for doc in load_set(name, split).documents:
        ids.extend(tokenizer(doc, verbose=False)["input_ids"])
    return ids


# ---------------------------------------------------------------- model

def llama_config(spec: TinySpec, vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.context,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=None,
        architectures=["LlamaForCausalLM"],
    )


def train(model, ids: list[int], spec: TinySpec, steps: int, lr: float, seed: int) -> float:
    """AdamW with warm-up and cosine decay on random windows; returns the last loss."""
    import torch

    g = torch.Generator().manual_seed(seed)
    data = torch.tensor(ids, dtype=torch.long)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    model.train()
    loss_value = float("nan")
    for step in range(steps):
        warm = min(1.0, (step + 1) / 20)
        for group in opt.param_groups:
            group["lr"] = lr * warm * 0.5 * (1 + math.cos(math.pi * step / steps))
        starts = torch.randint(0, len(data) - spec.train_seq_len - 1, (spec.batch,), generator=g)
        batch = torch.stack([data[s: s + spec.train_seq_len] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_value = float(loss.detach())
    model.eval()
    return loss_value


def save_fixture(model, out: Path, tok_dir: Path, record: dict) -> None:
    """A trained fixture as a release ships it: weights, config, tokenizer, and how it was made."""
    model.generation_config.do_sample = False
    model.save_pretrained(out)
    for f in tok_dir.iterdir():
        shutil.copy2(f, out / f.name)
    (out / "xquant-tiny.json").write_text(json.dumps(record, indent=2) + "\n")


def model_dir(spec: TinySpec = SPEC) -> Path:
    """The tiny trained LlamaForCausalLM (fp32 safetensors + tokenizer), built once (≈1–2 min)."""
    tok_dir = tokenizer_dir(spec)

    def build(tmp: Path) -> None:
        import torch
        from transformers import LlamaForCausalLM

        tokenizer = load_tokenizer(tok_dir)
        ids = encode_set(tokenizer, "mixed", "calib")
        torch.manual_seed(spec.seed)
        model = LlamaForCausalLM(llama_config(spec, len(tokenizer)))
        t0 = time.time()
        info(f"training the tiny model: {sum(p.numel() for p in model.parameters()):,} parameters, "
             f"{len(ids):,} tokens, {spec.steps} steps")
        loss = train(model, ids, spec, spec.steps, spec.lr, spec.seed)
        save_fixture(model, tmp, tok_dir, {"spec": asdict(spec), "final_train_loss": loss,
                                           "train_seconds": round(time.time() - t0, 1)})

    return _cached("llama", cache_key(spec, "model"), build)


def eval_perplexity(model_path: Path, set_name: str = "mixed", window: int | None = None) -> float:
    """Held-out perplexity of an HF model directory on a bundled eval split."""
    import torch
    from transformers import AutoModelForCausalLM

    from ..evaluate.perplexity import hf_logits_fn, perplexity

    tokenizer = load_tokenizer(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    ids = encode_set(tokenizer, set_name, "eval")
    return perplexity(hf_logits_fn(model), ids, window or SPEC.context)
