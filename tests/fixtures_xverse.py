"""Test fixture: a tiny XVERSE-shaped checkpoint and its transformers LLaMA twin, built from the tiny LLaMA.

XVERSE (`XverseForCausalLM`) is LLaMA's tensors and math under another name, with remote code and
a BPE tokenizer.json instead of tokenizer.model. transformers cannot load it as XVERSE without that
code, so the reference is the same directory named `LlamaForCausalLM`.

The tokenizer.json is the fast tokenizer transformers derives from the tiny SentencePiece model: a
BPE model with SentencePiece pieces ("▁"), byte fallback `<0x00>`..`<0xFF>`, a Metaspace
pre-tokenizer and `<unk>`/`<s>`/`</s>`: XVERSE's tokenizer kind, and the same ids the tiny model
was trained with, so its predictions stay meaningful. tokenizer.model is left out, as XVERSE does.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from xquant.demo import tiny

XVERSE_TOKENIZER_CONFIG = {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "add_bos_token": True,
    "add_eos_token": False,
    "model_max_length": tiny.SPEC.context,
    "clean_up_tokenization_spaces": False,
}


def _build(tmp: Path, architecture: str, model_type: str) -> None:
    src = tiny.model_dir()
    config = json.loads((src / "config.json").read_text())
    config.update(architectures=[architecture], model_type=model_type)
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in ("model.safetensors", "generation_config.json", "tokenizer.json"):
        shutil.copy2(src / name, tmp / name)
    (tmp / "tokenizer_config.json").write_text(json.dumps(XVERSE_TOKENIZER_CONFIG, indent=2) + "\n")


def xverse_dir() -> Path:
    """The tiny XVERSE-shaped checkpoint (config XverseForCausalLM / xverse, tokenizer.json only)."""
    return tiny._cached("xverse", tiny.cache_key(tiny.SPEC, "xverse"),
                        lambda tmp: _build(tmp, "XverseForCausalLM", "xverse"))


def reference_dir() -> Path:
    """The same files named LlamaForCausalLM: what transformers loads as the XVERSE reference."""
    return tiny._cached("xverse-llama", tiny.cache_key(tiny.SPEC, "xverse-llama"),
                        lambda tmp: _build(tmp, "LlamaForCausalLM", "llama"))
