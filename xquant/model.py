"""Opening checkpoints: a Hugging Face directory or a Meta original directory, lazily."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .arch import Architecture, for_config
from .errors import CorruptFileError, InputError
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


def require_dir(path: Path) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
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
    path = require_dir(path)
    config = read_json(path / "config.json")
    return HFModel(path, config, open_hf_tensors(path))


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
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
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
