"""`xquant inspect`: what a checkpoint is, without reading its weights."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from .io.dtypes import dtype_name
from .model import detect, open_hf, open_meta


def _disk_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _tensor_rows(reader) -> list[dict[str, Any]]:
    return [{"name": i.name, "shape": list(i.shape), "dtype": dtype_name(i.dtype), "bytes": i.nbytes}
            for i in reader.infos()]


def inspect_path(path: Path, tensors: bool = False) -> dict[str, Any]:
    """A summary of a checkpoint as plain data (rendered as a table or JSON by the CLI)."""
    kind = detect(path)
    if kind == "hf":
        return _inspect_hf(Path(path), tensors)
    if kind == "meta":
        return _inspect_meta(Path(path), tensors)
    from .gguf_inspect import inspect_gguf  # GGUF support lives with the GGUF writer

    return inspect_gguf(Path(path), tensors)


def _inspect_hf(path: Path, tensors: bool) -> dict[str, Any]:
    model = open_hf(path)
    c = model.config
    reader = model.tensors
    quant = model.quantization
    info: dict[str, Any] = {
        "path": str(path),
        "format": "huggingface",
        "architecture": ", ".join(c.get("architectures") or [c.get("model_type", "?")]),
        "xquant_arch": model.arch.name,
        "parameters": _param_count(reader, quant),
        "dtypes": dict(Counter(dtype_name(i.dtype) for i in reader.infos())),
        "torch_dtype": c.get("torch_dtype") or c.get("dtype"),
        "vocab_size": c.get("vocab_size"),
        "layers": c.get("num_hidden_layers"),
        "hidden_size": c.get("hidden_size"),
        "intermediate_size": c.get("intermediate_size"),
        "heads": c.get("num_attention_heads"),
        "kv_heads": c.get("num_key_value_heads", c.get("num_attention_heads")),
        "context_length": c.get("max_position_embeddings"),
        "weight_files": len(reader.files()),
        "tensor_count": len(reader),
        "size_on_disk": _disk_size(path),
        "quantization": quant,
    }
    info.update(_experts(model.arch, c))
    if tensors:
        info["tensors"] = _tensor_rows(reader)
    return info


def _experts(arch, c: dict[str, Any]) -> dict[str, Any]:
    """A mixture of experts' routing (the architecture's `[experts]` keys): routed experts per
    layer, how many each token is sent to, and the always-on shared experts."""
    x = arch.experts
    if x is None:
        return {}
    out: dict[str, Any] = {"experts": c.get(x.count), "experts_per_token": c.get(x.used)}
    if x.width:
        out["expert_width"] = c.get(x.width)
    if x.shared_count:
        out["shared_experts"] = c.get(x.shared_count) or 0
    elif any(role.startswith("shared_") for role in arch.layer):
        out["shared_experts"] = 1
    return out


def _param_count(reader, quant) -> int:
    """Parameters of the unquantized model: packed GPTQ weights are counted by what they stand for."""
    total = 0
    for i in reader.infos():
        name = i.name
        if name.endswith((".qzeros", ".scales", ".g_idx", ".SCB", ".weight_format")) or ".absmax" in name \
                or ".quant_map" in name or ".quant_state" in name or ".nested_" in name:
            continue
        if name.endswith(".qweight") and quant:
            total += i.numel * 32 // int(quant.get("bits", 4))
        elif quant and quant.get("load_in_4bit") and i.dtype.itemsize == 1 and i.numel and name.endswith(".weight"):
            total += i.numel * 2  # two 4-bit values per byte
        else:
            total += i.numel
    return total


def _inspect_meta(path: Path, tensors: bool) -> dict[str, Any]:
    model = open_meta(path)
    p = model.params
    reader = model.tensors
    shard0 = [i for i in reader.infos() if i.name.startswith("0/")]
    # Parameters: replicated tensors count once, split ones sum over shards.
    per_name: dict[str, list] = {}
    for i in reader.infos():
        per_name.setdefault(i.name.split("/", 1)[1], []).append(i)
    params = 0
    for name, infos in per_name.items():
        if name.endswith("norm.weight") or name == "rope.freqs":
            params += infos[0].numel
        else:
            params += sum(x.numel for x in infos)
    info: dict[str, Any] = {
        "path": str(path),
        "format": "meta",
        "architecture": "llama (Meta original)",
        "parameters": params,
        "dtypes": dict(Counter(dtype_name(i.dtype) for i in shard0)),
        "vocab_size": p.get("vocab_size"),
        "layers": p.get("n_layers"),
        "hidden_size": p.get("dim"),
        "heads": p.get("n_heads"),
        "kv_heads": p.get("n_kv_heads", p.get("n_heads")),
        "model_parallel_shards": model.shard_count,
        "weight_files": len(reader.files()),
        "tensor_count": len(shard0),
        "size_on_disk": _disk_size(path),
        "quantization": None,
    }
    if tensors:
        info["tensors"] = _tensor_rows(reader)
    return info
