"""GGUF key/value metadata: model hyperparameters from config.json, naming, and xquant provenance.

The keys and their types are the ones llama.cpp's `convert_hf_to_gguf.py` writes for a LLaMA model
(`general.*`, `<arch>.context_length`, `<arch>.attention.head_count_kv`, `<arch>.rope.*`, ...), built
as a plain list so `--dry-run` can show them before anything is read or written.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
from gguf import GGUFValueType as V
from gguf import Keys

from .. import __version__
from ..errors import InputError, UnsupportedError


@dataclass(frozen=True)
class KV:
    key: str
    value: Any
    vtype: V

    def display(self) -> str:
        if self.vtype == V.ARRAY:
            return f"[{len(self.value)} items]"
        return str(self.value)


# (GGUF key template, config.json keys tried in order, value type, required). The order is the
# order the converter writes them in.
HPARAMS: tuple[tuple[str, tuple[str, ...], V, bool], ...] = (
    (Keys.LLM.CONTEXT_LENGTH, ("max_position_embeddings", "n_ctx", "max_sequence_length"), V.UINT32, True),
    (Keys.LLM.EMBEDDING_LENGTH, ("hidden_size", "dim"), V.UINT32, True),
    (Keys.LLM.FEED_FORWARD_LENGTH, ("intermediate_size", "hidden_dim"), V.UINT32, True),
    (Keys.Attention.HEAD_COUNT, ("num_attention_heads", "n_heads"), V.UINT32, True),
    (Keys.Attention.HEAD_COUNT_KV, ("num_key_value_heads", "n_kv_heads", "num_attention_heads"), V.UINT32, True),
    (Keys.Attention.LAYERNORM_RMS_EPS, ("rms_norm_eps", "norm_eps"), V.FLOAT32, True),
    (Keys.Attention.KEY_LENGTH, ("head_dim",), V.UINT32, False),
    (Keys.Attention.VALUE_LENGTH, ("head_dim",), V.UINT32, False),
)

SUPPORTED_ACTIVATIONS = ("silu",)


def _find(config: dict[str, Any], keys: tuple[str, ...]) -> Any:
    return next((config[k] for k in keys if config.get(k) is not None), None)


def rope_settings(config: dict[str, Any], source: str) -> tuple[float | None, str, float | None]:
    """(freq base, scaling type, scaling factor) from either transformers' layout: `rope_theta` +
    `rope_scaling` (4.x) or `rope_parameters` (5.x)."""
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    theta = config.get("rope_theta", params.get("rope_theta"))
    kind = scaling.get("rope_type", scaling.get("type")) or params.get("rope_type") or "default"
    factor = scaling.get("factor", params.get("factor"))
    if kind not in ("default", "linear"):
        raise UnsupportedError(f"{source}: rope scaling '{kind}' is not supported for GGUF (supported: default, linear)")
    return theta, kind, factor


def hparams_kv(config: dict[str, Any], gguf_arch: str, n_layers: int, source: str,
               extra: dict[str, str] | None = None, constants: dict[str, Any] | None = None) -> list[KV]:
    """The architecture keys of a LLaMA-like config, typed as llama.cpp reads them; `extra` adds
    unsigned keys `<arch>.KEY` from config keys (an architecture's `[gguf] hparams`, e.g. expert counts),
    `constants` keys `<arch>.KEY` with fixed values (`[gguf] constants`: uint32, float32 or bool)."""
    act = config.get("hidden_act", "silu")
    if act not in SUPPORTED_ACTIVATIONS:
        raise UnsupportedError(f"{source}: hidden_act '{act}' is not supported for GGUF (supported: silu)")
    out = [KV(Keys.LLM.BLOCK_COUNT.format(arch=gguf_arch), n_layers, V.UINT32)]
    for template, keys, vtype, required in HPARAMS:
        value = _find(config, keys)
        if value is None:
            if required:
                raise InputError(f"{source}: missing '{keys[0]}', needed for {template.format(arch=gguf_arch)}")
            continue
        out.append(KV(template.format(arch=gguf_arch), float(value) if vtype == V.FLOAT32 else int(value), vtype))
    for key, config_key in (extra or {}).items():
        value = config.get(config_key)
        if not isinstance(value, int) or isinstance(value, bool):
            raise InputError(f"{source}: '{config_key}' ({value!r}) is not an integer, needed for {gguf_arch}.{key}")
        out.append(KV(f"{gguf_arch}.{key}", value, V.UINT32))
    for key, value in (constants or {}).items():
        vtype = V.BOOL if isinstance(value, bool) else V.UINT32 if isinstance(value, int) else V.FLOAT32
        out.append(KV(f"{gguf_arch}.{key}", value, vtype))
    theta, kind, factor = rope_settings(config, source)
    if theta is not None:
        out.append(KV(Keys.Rope.FREQ_BASE.format(arch=gguf_arch), float(theta), V.FLOAT32))
    out.append(KV(Keys.LLM.VOCAB_SIZE.format(arch=gguf_arch), int(config["vocab_size"]), V.UINT32))
    head_dim = config.get("head_dim") or int(config["hidden_size"]) // int(config["num_attention_heads"])
    out.append(KV(Keys.Rope.DIMENSION_COUNT.format(arch=gguf_arch), int(head_dim), V.UINT32))
    if kind == "linear":
        if not factor:
            raise InputError(f"{source}: linear rope scaling without a 'factor'")
        out.append(KV(Keys.Rope.SCALING_TYPE.format(arch=gguf_arch), "linear", V.STRING))
        out.append(KV(Keys.Rope.SCALING_FACTOR.format(arch=gguf_arch), float(factor), V.FLOAT32))
    return out


def general_kv(model_dir: Path, config: dict[str, Any], n_params: int, file_type: int) -> list[KV]:
    """general.* naming keys, file type and quantization version."""
    name = Path(str(config.get("_name_or_path") or model_dir.resolve().name)).name or model_dir.name
    return [
        KV(Keys.General.TYPE, "model", V.STRING),
        KV(Keys.General.NAME, name, V.STRING),
        KV(Keys.General.SIZE_LABEL, gguf.size_label(n_params, n_params, 0, 0), V.STRING),
        KV(Keys.General.FILE_TYPE, int(file_type), V.UINT32),
        KV(Keys.General.QUANTIZATION_VERSION, gguf.GGML_QUANT_VERSION, V.UINT32),
    ]


def source_digest(input_records: list[dict[str, Any]]) -> str:
    """One sha256 over the sha256 of every input file (name-sorted), the source's fingerprint."""
    h = hashlib.sha256()
    for rec in sorted(input_records, key=lambda r: Path(r["path"]).name):
        h.update(f"{Path(rec['path']).name}:{rec['sha256']}\n".encode())
    return h.hexdigest()


def provenance_kv(command: str, options: dict[str, Any], digest: str) -> list[KV]:
    """xquant.* keys: who made the file, from what (source digest), with which options."""
    return [
        KV(Keys.General.QUANTIZED_BY, f"xquant {__version__}", V.STRING),
        KV("xquant.version", __version__, V.STRING),
        KV("xquant.command", command, V.STRING),
        KV("xquant.source_sha256", digest, V.STRING),
        KV("xquant.options", json.dumps(options, sort_keys=True, default=str), V.STRING),
    ]


def add_all(writer: gguf.GGUFWriter, kvs: list[KV]) -> None:
    for kv in kvs:
        writer.add_key_value(kv.key, kv.value, kv.vtype)
