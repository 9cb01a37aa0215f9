"""Opening checkpoints: a Hugging Face directory or a Meta original directory, lazily."""

from __future__ import annotations

import errno
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .arch import Architecture, for_config
from .errors import CorruptFileError, InputError, ShapeError, UnsupportedError
from .io.readers import TensorReader, open_hf_tensors, open_meta_tensors

TOKENIZER_FILES = (
    "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "chat_template.jinja",
)


def read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptFileError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise CorruptFileError(f"{path}: expected a JSON object")
    return obj


def require_exists(path: Path) -> Path:
    """path, expanded; InputError saying why when it cannot be opened (missing, a symlink loop, a
    dangling symlink, no permission)."""
    path = Path(path).expanduser()
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise InputError(f"{path}: symlink loop (too many levels of symbolic links)") from None
        if e.errno == errno.ENOENT and path.is_symlink():
            raise InputError(f"{path}: dangling symlink (to {os.readlink(path)}, which does not exist)") from None
        if e.errno == errno.ENOENT:
            raise InputError(f"{path}: no such file or directory") from None
        raise InputError(f"{path}: cannot open ({e.strerror})") from None
    return path


def require_dir(path: Path) -> Path:
    path = require_exists(path)
    if not path.is_dir():
        raise InputError(f"{path}: not a directory")
    return path


@dataclass
class HFModel:
    """A Hugging Face model directory: config, architecture and a lazy tensor reader."""

    path: Path
    config: dict[str, Any]
    tensors: TensorReader

    @property
    def arch(self) -> Architecture:
        return for_config(self.config, str(self.path / "config.json"))

    @property
    def quantization(self) -> dict[str, Any] | None:
        return self.config.get("quantization_config")

    def tokenizer_files(self) -> list[Path]:
        return [self.path / n for n in TOKENIZER_FILES if (self.path / n).exists()]


def open_hf(path: Path) -> HFModel:
    """A Hugging Face directory, its config checked against its tensors' shapes (`check_config`)."""
    path = require_dir(path)
    config = read_json(path / "config.json")
    model = HFModel(path, config, open_hf_tensors(path))
    check_config(model)
    return model


# Role -> the config size each axis of its tensor must equal ("q_rows": heads x head size,
# "kv_rows": kv heads x head size). Roles an architecture does not have are skipped.
ROLE_SIZES: dict[str, tuple[str, ...]] = {
    "embed": ("vocab_size", "hidden_size"), "lm_head": ("vocab_size", "hidden_size"), "norm": ("hidden_size",),
    "attn_norm": ("hidden_size",), "ffn_norm": ("hidden_size",),
    "q": ("q_rows", "hidden_size"), "k": ("kv_rows", "hidden_size"), "v": ("kv_rows", "hidden_size"),
    "o": ("hidden_size", "q_rows"),
    "gate": ("intermediate_size", "hidden_size"), "up": ("intermediate_size", "hidden_size"),
    "down": ("hidden_size", "intermediate_size"),
}
_DENSE_MLP = ("gate", "up", "down")  # a mixture of experts' widths live in its [experts] keys: not checked


def _config_int(config: dict[str, Any], key: str) -> int | None:
    value = config.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def check_config(model: HFModel) -> None:
    """config.json must describe the tensors it sits beside: vocabulary, hidden and feed-forward
    sizes, head counts and the layer count, checked by architecture role against tensor shapes.

    A wrong value would otherwise be copied into every artifact (GGUF metadata, quantization
    configs) and fail only when a runtime loads it, or load and compute garbage. Keys the config
    lacks, roles the architecture lacks and quantized (packed) tensors are skipped.
    """
    try:
        arch = model.arch
    except UnsupportedError:
        return  # the command that needs the architecture reports it
    config, reader = model.config, model.tensors
    source = model.path / "config.json"
    sizes = {k: _config_int(config, k) for k in ("vocab_size", "hidden_size", "intermediate_size")}
    hidden, heads = sizes["hidden_size"], _config_int(config, "num_attention_heads")
    kv_heads = _config_int(config, "num_key_value_heads") or heads
    head_dim = _config_int(config, "head_dim")
    if heads is not None and heads < 1:
        raise ShapeError(f"{source}: num_attention_heads {heads} must be positive")
    if heads and head_dim is None and hidden is not None:
        if hidden % heads:
            raise ShapeError(f"{source}: hidden_size {hidden} is not divisible by num_attention_heads {heads}")
        head_dim = hidden // heads
    if heads and kv_heads and heads % kv_heads:
        raise ShapeError(f"{source}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    why = {k: f"{k} {v}" for k, v in sizes.items()}
    if heads and head_dim:
        sizes["q_rows"] = heads * head_dim
        why["q_rows"] = f"num_attention_heads {heads} x head size {head_dim} = {heads * head_dim}"
    if kv_heads and head_dim:
        sizes["kv_rows"] = kv_heads * head_dim
        why["kv_rows"] = f"num_key_value_heads {kv_heads} x head size {head_dim} = {kv_heads * head_dim}"
    layers = _layers_present(arch, reader)
    n_layers = _config_int(config, "num_hidden_layers")
    if n_layers is not None:
        if layers and max(layers) >= n_layers:
            name = next(n for n in reader.names() if arch.layer_of(n) == max(layers))
            raise ShapeError(f"{source}: num_hidden_layers {n_layers}, but tensor '{name}' belongs to layer "
                             f"{max(layers)}")
        missing = sorted(set(range(n_layers)) - layers)
        if missing:
            raise ShapeError(f"{source}: num_hidden_layers {n_layers}, but there are no tensors of layer {missing[0]} "
                             f"({arch.layers_module}.{missing[0]}.*; {len(layers)} layers present)")
    roles = [(role, tmpl) for role, tmpl in arch.globals.items()]
    roles += [(role, tmpl.format(i=i)) for i in sorted(layers) for role, tmpl in arch.layer.items()]
    quantized = bool(model.quantization)
    for role, name in roles:
        axes = ROLE_SIZES.get(role)
        if axes is None or name not in reader or (role in _DENSE_MLP and arch.is_moe):
            continue
        info = reader.info(name)
        if quantized and not info.dtype.is_floating_point:
            continue  # packed by a quantizer: its shape is the format's, not the model's
        if len(info.shape) != len(axes):
            raise ShapeError(f"{info.file}: tensor '{name}' is {_fmt(info.shape)}, expected "
                             f"{len(axes)} dimensions ({' x '.join(axes)})")
        want = tuple(sizes.get(key) or got for key, got in zip(axes, info.shape))
        if want != tuple(info.shape):
            key = next(k for k, got, w in zip(axes, info.shape, want) if got != w)
            raise ShapeError(f"{source}: {why[key]}, but tensor '{name}' is {_fmt(info.shape)} "
                             f"(expected {_fmt(want)})")


def _fmt(shape) -> str:
    return "x".join(map(str, shape)) if len(shape) else "scalar"


def _layers_present(arch: Architecture, reader: TensorReader) -> set[int]:
    return {layer for n in reader.names() if (layer := arch.layer_of(n)) is not None}


@dataclass
class MetaModel:
    """Meta's original layout: params.json + consolidated.NN.pth shards + tokenizer.model."""

    path: Path
    params: dict[str, Any]
    tensors: TensorReader

    @property
    def shard_count(self) -> int:
        return getattr(self.tensors, "shard_count", 1)


def open_meta(path: Path) -> MetaModel:
    path = require_dir(path)
    params = read_json(path / "params.json")
    return MetaModel(path, params, open_meta_tensors(path))


def detect(path: Path) -> str:
    """'hf', 'meta', 'gguf' or raise: what kind of checkpoint lies at path."""
    path = require_exists(path)
    if path.is_file():
        with open(path, "rb") as f:
            if f.read(4) == b"GGUF":
                return "gguf"
        raise InputError(f"{path}: not a model directory or GGUF file")
    if (path / "config.json").exists():
        return "hf"
    if (path / "params.json").exists():
        return "meta"
    raise InputError(f"{path}: not a model directory (no config.json or params.json)")
