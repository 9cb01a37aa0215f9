"""Meta's `params.json`: reading, validating, and the sizes it implies.

Meta's reference code builds its model from `ModelArgs(**params)`, so params.json holds only a few
keys: dim, n_layers, n_heads, optional n_kv_heads (grouped-query attention, Llama-2 70B),
multiple_of and optional ffn_dim_multiplier (which fix the feed-forward size), norm_eps, vocab_size
(-1 in the LLaMA-1/Llama-2 releases: the tokenizer decides) and optional rope_theta (Code Llama).
This module turns those into the Hugging Face LlamaConfig fields and back (for the exporter).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError, ShapeError, UnsupportedError
from ..model import read_json

# Keys Meta's ModelArgs knows that change nothing here (batch size is an inference setting).
_IGNORED = ("max_batch_size",)
_KNOWN = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
          "norm_eps", "rope_theta", "max_seq_len", *_IGNORED)
# Keys of later Meta releases whose model xquant's LLaMA path would get wrong.
_UNSUPPORTED = {"use_scaled_rope": "Llama 3.1 scaled rotary embeddings", "moe_args": "mixture of experts",
                "vision_chunk_size": "vision encoder"}
DEFAULT_ROPE_THETA = 10000.0
DEFAULT_MULTIPLE_OF = 256


def meta_ffn_size(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's feed-forward width: 2/3 of 4*dim, scaled, rounded up to a multiple of multiple_of.

    The float arithmetic and truncations follow Meta's FeedForward so the result is bit-identical.
    """
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def ffn_params_for(dim: int, ffn: int) -> tuple[int, float | None]:
    """(multiple_of, ffn_dim_multiplier) with which Meta's rule gives exactly `ffn` (for export)."""
    steps = [256, 128, 64, 32, 16, 8, 4, 2, 1]
    for m in steps:
        if meta_ffn_size(dim, m, None) == ffn:
            return m, None
    base = int(2 * (4 * dim) / 3)
    for m in steps:
        if ffn % m:
            continue
        for digits in (2, 3, 4, 6, 8):
            mult = round(ffn / base, digits)
            if meta_ffn_size(dim, m, mult) == ffn:
                return m, mult
    raise UnsupportedError(f"intermediate_size {ffn} cannot be expressed with Meta's FFN rule for dim {dim}")


def _int(path: Path, params: dict, key: str, default: Any = None, minimum: int = 1) -> int:
    value = params.get(key, default)
    if value is None:
        raise InputError(f"{path}: missing '{key}'")
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InputError(f"{path}: '{key}' must be an integer >= {minimum}, got {value!r}")
    return value


def _float(path: Path, params: dict, key: str, default: float | None) -> float | None:
    value = params.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise InputError(f"{path}: '{key}' must be a positive number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class MetaParams:
    """The validated contents of params.json plus the sizes derived from them."""

    path: Path
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    multiple_of: int
    ffn_dim_multiplier: float | None
    norm_eps: float
    vocab_size: int  # -1: not stated, taken from the tensors
    rope_theta: float
    max_seq_len: int | None

    @classmethod
    def read(cls, path: Path) -> MetaParams:
        return cls.from_dict(read_json(path), path)

    @classmethod
    def from_dict(cls, params: dict[str, Any], path: Path) -> MetaParams:
        """Validate a params.json object; `path` names it in error messages."""
        if isinstance(params.get("model"), dict) and "dim" not in params:
            params = params["model"]  # some later releases nest the arguments
        for key, what in _UNSUPPORTED.items():
            if params.get(key):
                raise UnsupportedError(f"{path}: '{key}' ({what}) is not supported; LLaMA-1/Llama-2 layouts are")
        unknown = sorted(k for k in params if k not in _KNOWN and k not in _UNSUPPORTED)
        if unknown:
            raise UnsupportedError(f"{path}: unknown key '{unknown[0]}' (known: {', '.join(_KNOWN)})")
        dim = _int(path, params, "dim")
        n_heads = _int(path, params, "n_heads")
        p = cls(
            path=path,
            dim=dim,
            n_layers=_int(path, params, "n_layers"),
            n_heads=n_heads,
            n_kv_heads=_int(path, params, "n_kv_heads", n_heads),
            multiple_of=_int(path, params, "multiple_of", DEFAULT_MULTIPLE_OF),
            ffn_dim_multiplier=_float(path, params, "ffn_dim_multiplier", None),
            norm_eps=_float(path, params, "norm_eps", 1e-5),
            vocab_size=_int(path, params, "vocab_size", -1, minimum=-1),
            rope_theta=_float(path, params, "rope_theta", DEFAULT_ROPE_THETA),
            max_seq_len=_int(path, params, "max_seq_len", None) if params.get("max_seq_len") is not None else None,
        )
        p.check()
        return p

    def check(self) -> None:
        if self.vocab_size == 0:
            raise InputError(f"{self.path}: 'vocab_size' must be positive or -1, got 0")
        if self.dim % self.n_heads:
            raise ShapeError(f"{self.path}: dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.head_dim % 2:
            raise ShapeError(f"{self.path}: head size {self.head_dim} (dim / n_heads) must be even (rotary pairs)")
        if self.n_heads % self.n_kv_heads:
            raise ShapeError(f"{self.path}: n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.head_dim * self.n_kv_heads

    @property
    def ffn_dim(self) -> int:
        return meta_ffn_size(self.dim, self.multiple_of, self.ffn_dim_multiplier)

    def sizes(self, vocab: int) -> dict[str, int]:
        """Symbol -> size, for the shape templates of the layout."""
        return {"dim": self.dim, "vocab": vocab, "ffn": self.ffn_dim, "kv_dim": self.kv_dim}

    def explain(self, symbol: str, sizes: dict[str, int]) -> str:
        """Where a derived size comes from, for error messages."""
        if symbol == "ffn":
            mult = self.ffn_dim_multiplier
            return (f"feed-forward size {self.ffn_dim} by Meta's rule from dim {self.dim}, multiple_of "
                    f"{self.multiple_of}, ffn_dim_multiplier {mult if mult is not None else 'none'}")
        if symbol == "kv_dim":
            return f"n_kv_heads {self.n_kv_heads} x head size {self.head_dim}"
        if symbol == "vocab":
            return f"vocab_size {sizes['vocab']}" + (" from the embedding" if self.vocab_size < 0 else "")
        return f"{symbol} {sizes[symbol]}"

    def context(self) -> tuple[int, str]:
        """max_position_embeddings and why: params.json does not state it, so the release decides."""
        if self.max_seq_len:
            return self.max_seq_len, "max_seq_len in params.json"
        if self.rope_theta >= 1e6:
            return 16384, f"Code Llama (rope_theta {self.rope_theta:g})"
        if self.norm_eps <= 1e-6:
            return 2048, f"LLaMA-1 (norm_eps {self.norm_eps:g})"
        if self.dim == 8192 and self.n_kv_heads == self.n_heads:  # LLaMA-1 65B uses 1e-5 too
            return 2048, "LLaMA-1 65B (dim 8192 without grouped-query attention)"
        return 4096, f"Llama-2 (norm_eps {self.norm_eps:g})"

    def hf_config(self, vocab: int, context: int, dtype: str, bos: int, eos: int) -> dict[str, Any]:
        """config.json for LlamaForCausalLM, in the form the installed transformers writes it."""
        from transformers import LlamaConfig

        return LlamaConfig(
            architectures=["LlamaForCausalLM"],
            vocab_size=vocab,
            hidden_size=self.dim,
            intermediate_size=self.ffn_dim,
            num_hidden_layers=self.n_layers,
            num_attention_heads=self.n_heads,
            num_key_value_heads=self.n_kv_heads,
            max_position_embeddings=context,
            rms_norm_eps=self.norm_eps,
            rope_theta=self.rope_theta,
            tie_word_embeddings=False,
            bos_token_id=bos,
            eos_token_id=eos,
            pad_token_id=None,
            dtype=dtype,
        ).to_diff_dict()


def params_from_hf_config(config: dict[str, Any], source: str) -> dict[str, Any]:
    """The params.json a Meta release would ship for this Hugging Face LLaMA config (for export)."""
    dim, heads = config["hidden_size"], config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    rope = config.get("rope_parameters") or {}
    theta = rope.get("rope_theta", config.get("rope_theta", DEFAULT_ROPE_THETA))
    if (rope.get("rope_type") or "default") != "default" or config.get("rope_scaling"):
        raise UnsupportedError(f"{source}: scaled rotary embeddings have no Meta LLaMA-1/Llama-2 equivalent")
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise UnsupportedError(f"{source}: biases have no place in Meta's LLaMA layout")
    if config.get("head_dim") not in (None, dim // heads):
        raise UnsupportedError(f"{source}: head_dim {config['head_dim']} differs from hidden_size / heads")
    multiple_of, mult = ffn_params_for(dim, config["intermediate_size"])
    # Key order and presence as in Meta's own files (Llama-2 70B's order): optional keys only where
    # they matter; vocab_size is added by the caller.
    params: dict[str, Any] = {"dim": dim, "multiple_of": multiple_of}
    if mult is not None:
        params["ffn_dim_multiplier"] = mult
    params["n_heads"] = heads
    if kv != heads:
        params["n_kv_heads"] = kv
    params["n_layers"] = config["num_hidden_layers"]
    params["norm_eps"] = config.get("rms_norm_eps", 1e-6)
    if float(theta) != DEFAULT_ROPE_THETA:
        params["rope_theta"] = float(theta)
    return params
