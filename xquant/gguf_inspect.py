"""`xquant inspect FILE.gguf`: architecture, hyperparameters, tensor types, vocabulary and metadata
of a GGUF file, read from its header with gguf-py's reader (tensor data is memory-mapped, not read).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from .errors import CorruptFileError

# Shown in full; every other key is listed by name under "metadata keys".
_ARCH_KEYS = {
    "context_length": "context_length", "embedding_length": "hidden_size", "feed_forward_length":
    "intermediate_size", "block_count": "layers", "attention.head_count": "heads",
    "attention.head_count_kv": "kv_heads", "rope.freq_base": "rope_freq_base",
    "rope.dimension_count": "rope_dimensions", "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "vocab_size": "vocab_size",
}
_TOKEN_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
                 "tokenizer.ggml.merges")


def _value(field) -> Any:
    """A field's value; long arrays (vocabularies) are summarised by their length."""
    import gguf

    if field.types and field.types[0] == gguf.GGUFValueType.ARRAY:
        if len(field.data) > 16:
            return f"[{len(field.data)} items]"
    if field.types == [gguf.GGUFValueType.FLOAT32]:
        return float(f"{field.contents():.7g}")  # 1e-05, not float32's 9.999999747378752e-06
    return field.contents()


def inspect_gguf(path: Path, tensors: bool = False) -> dict[str, Any]:
    """A summary of a GGUF file as plain data (rendered as a table or JSON by the CLI)."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError) as e:
        raise CorruptFileError(f"{path}: not a readable GGUF file ({e})") from None
    fields = {f.name: f for f in reader.fields.values() if not f.name.startswith("GGUF.")}

    def get(key: str, default: Any = None) -> Any:
        f = fields.get(key)
        return _value(f) if f is not None else default

    arch = get("general.architecture", "?")
    file_type = get("general.file_type")
    try:
        ftype_name = gguf.LlamaFileType(file_type).name if file_type is not None else None
    except ValueError:
        ftype_name = str(file_type)
    tokens = fields.get("tokenizer.ggml.tokens")
    info: dict[str, Any] = {
        "path": str(path),
        "format": f"gguf v{int(reader.fields['GGUF.version'].contents())}" if "GGUF.version" in reader.fields else "gguf",
        "architecture": arch,
        "name": get("general.name"),
        "file_type": ftype_name,
        "parameters": sum(int(t.n_elements) for t in reader.tensors),
        "tensor_types": dict(Counter(t.tensor_type.name for t in reader.tensors)),
        "tensor_count": len(reader.tensors),
    }
    for key, label in _ARCH_KEYS.items():
        value = get(f"{arch}.{key}")
        if value is not None:
            info[label] = value
    info["vocabulary"] = {
        "model": get("tokenizer.ggml.model"), "pre": get("tokenizer.ggml.pre"),
        "tokens": len(tokens.data) if tokens is not None else 0,
        **{k: get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "unknown", "padding")
           if f"tokenizer.ggml.{k}_token_id" in fields},
        **{f"add_{k}": get(f"tokenizer.ggml.add_{k}_token") for k in ("bos", "eos")
           if f"tokenizer.ggml.add_{k}_token" in fields},
    }
    if "split.count" in fields:
        info["split"] = f"file {get('split.no') + 1} of {get('split.count')} ({get('split.tensors.count')} tensors in all)"
    provenance = {k.removeprefix("xquant."): get(k) for k in fields if k.startswith("xquant.")}
    if "options" in provenance:
        try:
            provenance["options"] = json.loads(provenance["options"])
        except ValueError:
            pass
    if provenance:
        info["xquant"] = provenance
    imatrix = {k.removeprefix("quantize.imatrix."): get(k) for k in fields if k.startswith("quantize.imatrix.")}
    if imatrix:
        info["imatrix"] = imatrix
    if get("general.type") == "imatrix":  # not a model: no architecture, no vocabulary
        info["architecture"] = "- (llama.cpp importance matrix)"
        info.pop("vocabulary")
        info["importance_matrix"] = _imatrix_summary(reader, get)
    info["metadata_keys"] = ", ".join(k for k in fields if k not in _TOKEN_ARRAYS)
    info["size_on_disk"] = Path(path).stat().st_size
    if tensors:
        info["tensors"] = [{"name": t.name, "shape": [int(d) for d in t.shape], "dtype": t.tensor_type.name,
                            "bytes": int(t.n_bytes)} for t in reader.tensors]
    return info


def _imatrix_summary(reader, get) -> dict[str, Any]:
    """A llama.cpp imatrix file (`<weight>.in_sum2` / `<weight>.counts` per weight): its entries,
    and for stacked routed experts (counts ne = [1, experts]) how many experts saw no token."""
    import numpy as np

    counts = {t.name.removesuffix(".counts"): t for t in reader.tensors if t.name.endswith(".counts")}
    experts = {name: np.asarray(t.data).reshape(-1) for name, t in counts.items() if int(t.n_elements) > 1}
    out: dict[str, Any] = {"entries": len(counts), "expert_entries": len(experts),
                           "chunks": get("imatrix.chunk_count"), "chunk_size": get("imatrix.chunk_size"),
                           "datasets": get("imatrix.datasets")}
    if experts:
        out["experts_per_entry"] = sorted({c.size for c in experts.values()})
        out["expert_matrices_without_tokens"] = int(sum((c == 0).sum() for c in experts.values()))
    return out
