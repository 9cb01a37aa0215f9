"""The exact float model a GPTQ checkpoint stands for, built with xquant's own dequantizer.

Used by the evaluation runtime (runtimes.GPTQRuntime) when no GPTQ loader (optimum + gptqmodel)
is installed, and as the reference a GPTQ loader's logits are compared with. It is a loader, so it
lives with the runtimes; from the quantizer it uses only the format's read side (pack.dequantize)
and the inverse of the walker's expert unfusing (moe.fuse_experts). Routed experts (stored per
expert) are stacked into the fused parameters transformers' MoE classes hold. Reads tensor by
tensor; the model it returns is, of course, whole.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ShapeError, UnsupportedError
from ..io.readers import open_hf_tensors
from ..model import read_json
from ..quant.gptq.moe import fuse_experts
from ..quant.gptq.pack import SUFFIXES, dequantize


def dequantized_tensors(path: Path, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """name -> tensor of the unquantized model: every `P.qweight` group becomes `P.weight`."""
    path = Path(path)
    config = read_json(path / "config.json")
    qc = config.get("quantization_config") or {}
    if qc.get("quant_method") != "gptq":
        raise UnsupportedError(f"{path / 'config.json'}: not a GPTQ checkpoint (quant_method {qc.get('quant_method')})")
    fmt = qc.get("checkpoint_format") or qc.get("format") or "gptq"
    if fmt != "gptq":
        raise UnsupportedError(f"{path / 'config.json'}: checkpoint format '{fmt}' (xquant reads GPTQ v1, 'gptq')")
    bits = int(qc["bits"])
    reader = open_hf_tensors(path)
    out: dict[str, torch.Tensor] = {}
    prefixes = [n.removesuffix(".qweight") for n in reader.names() if n.endswith(".qweight")]
    packed = {f"{p}.{s}" for p in prefixes for s in SUFFIXES}
    for p in prefixes:
        missing = [s for s in SUFFIXES if f"{p}.{s}" not in reader]
        if missing:
            raise ShapeError(f"{path}: '{p}' has a qweight but no {missing[0]}")
        parts = [reader.get(f"{p}.{s}") for s in SUFFIXES]
        out[f"{p}.weight"] = dequantize(*parts, bits=bits).to(dtype)
    for n in reader.names():
        if n not in packed:
            t = reader.get(n)
            out[n] = t.to(dtype) if t.dtype.is_floating_point else t
    reader.release()
    return out


def load_dequantized(path: Path, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """A transformers causal LM holding the dequantized weights of a GPTQ checkpoint."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    config = read_json(path / "config.json")
    config.pop("quantization_config", None)
    model_type = config.pop("model_type", "llama")
    cfg = AutoConfig.for_model(model_type, **config)
    with init_empty_weights(include_buffers=False):  # parameters on meta; rotary buffers real
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    state = dequantized_tensors(path, dtype)
    # A mixture of experts: transformers holds the routed experts fused; the checkpoint per expert.
    from ..arch import for_config

    fuse_experts(state, for_config(read_json(path / "config.json"), str(path / "config.json")),
                 {**config, "model_type": model_type}, set(model.state_dict()))
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.missing_keys:
        raise ShapeError(f"{path}: no tensor for '{result.missing_keys[0]}'")
    return model.to(device).eval()
