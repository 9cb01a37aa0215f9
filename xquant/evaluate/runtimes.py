"""Runtimes: each artifact kind is evaluated in its real consumer, behind one small interface.

A runtime loads an artifact and answers two questions: how it tokenizes text, and what logits it
gives for a sequence of ids. The registry maps artifact kinds to runtimes; `detect_kind` reads the
artifact (config.json's quantization_config, or the GGUF magic) to pick one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from ..errors import MissingDependencyError, UnsupportedError

_RUNTIMES: dict[str, type["Runtime"]] = {}


def register(kind: str) -> Callable[[type["Runtime"]], type["Runtime"]]:
    def deco(cls: type["Runtime"]) -> type["Runtime"]:
        cls.kind = kind
        _RUNTIMES[kind] = cls
        return cls

    return deco


def detect_kind(path: Path) -> str:
    """'hf', 'int8', 'nf4', 'gptq' or 'gguf' for an artifact path."""
    from ..model import detect

    path = Path(path)
    kind = detect(path)
    if kind == "gguf":
        return "gguf"
    if kind == "meta":
        raise UnsupportedError(f"{path}: a Meta original checkpoint has no runtime; `xquant convert` it first")
    config_path = path / "config.json"
    q = json.loads(config_path.read_text()).get("quantization_config") or {}
    method = q.get("quant_method")
    if method is None:
        return "hf"
    if method == "bitsandbytes":
        return "int8" if q.get("load_in_8bit") else "nf4"
    if method == "gptq":
        return "gptq"
    raise UnsupportedError(f"{config_path}: quantization method '{method}' has no runtime "
                           f"(known: {', '.join(sorted(_RUNTIMES))})")


def open_runtime(path: Path, device: str = "cpu") -> "Runtime":
    kind = detect_kind(path)
    return _RUNTIMES[kind](Path(path), device)


class Runtime:
    kind = "?"
    engine = "?"  # what actually ran it, for the report

    def __init__(self, path: Path, device: str = "cpu"):
        self.path = path
        self.device = device

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def logits(self, ids: list[int]) -> torch.Tensor:
        """[len(ids), vocab] float32 logits on CPU."""
        raise NotImplementedError

    @property
    def context(self) -> int:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _Transformers(Runtime):
    """Anything transformers loads by itself from the directory (its config says how)."""

    engine = "transformers"

    def __init__(self, path: Path, device: str = "cpu"):
        super().__init__(path, device)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self._tmp = None
        self.path = self._loadable(path)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.model = self._load(AutoModelForCausalLM)
        self.model.eval()

    def _load(self, auto):
        # On CPU, half-precision weights are evaluated in float32 (CPU kernels for fp16 are slow or
        # missing); on a GPU the artifact's own dtype is used.
        dtype = torch.float32 if self.device == "cpu" else "auto"
        return auto.from_pretrained(self.path, dtype=dtype, device_map=self.device)

    def _loadable(self, path: Path) -> Path:
        """A directory transformers can load: for architectures that ship as remote code but share
        another class's math, or that xquant implements itself (the registry's `transformers_as`,
        its module imported so the class is registered), a view of the same files with that class
        named in config.json (and no `auto_map` to the remote code)."""
        from ..arch import for_config

        config = json.loads((path / "config.json").read_text())
        alias = for_config(config, str(path / "config.json")).transformers_as
        if alias is None:
            return path
        alias.register()
        config.pop("auto_map", None)
        import tempfile

        self._tmp = tempfile.TemporaryDirectory(prefix="xquant-as-")
        view = Path(self._tmp.name)
        for f in path.iterdir():
            if f.name != "config.json":
                (view / f.name).symlink_to(f.resolve())
        (view / "config.json").write_text(json.dumps({**config, **alias.config_fields()}))
        self.engine = f"{self.engine} (as {alias.architectures[0]})"
        return view

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, verbose=False)["input_ids"]

    @torch.inference_mode()
    def logits(self, ids: list[int]) -> torch.Tensor:
        out = self.model(torch.tensor([ids], device=self.model.device))
        return out.logits[0].float().cpu()

    @property
    def context(self) -> int:
        return int(self.model.config.max_position_embeddings)


@register("hf")
class HFRuntime(_Transformers):
    engine = "transformers"


@register("int8")
class Int8Runtime(_Transformers):
    engine = "transformers + bitsandbytes (LLM.int8)"

    def _load(self, auto):
        _require("bitsandbytes", "evaluating an int8 artifact", "int8")
        return auto.from_pretrained(self.path, device_map=self.device)


@register("nf4")
class NF4Runtime(Int8Runtime):
    engine = "transformers + bitsandbytes (NF4)"

    def _load(self, auto):
        return nf4_cpu_fallback(super()._load(auto))


# bitsandbytes' packed CPU kernel for 4-bit weights (used on CPUs with AVX512-BF16) needs the
# output features in blocks of this many and fails otherwise (a MoE's 1-output shared-expert gate).
_CPU_PACK_BLOCK = 32


def nf4_cpu_fallback(model):
    """Route 4-bit linears whose output size the packed CPU kernel cannot take through
    bitsandbytes' generic dequantize-and-matmul path instead (same weights, same math)."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu") and module.out_features % _CPU_PACK_BLOCK:
            module.support_avx512bf16_for_cpu = False
    return model


@register("gptq")
class GPTQRuntime(_Transformers):
    """transformers + optimum + gptqmodel when installed, else xquant's exact dequantized reference.

    A mixture of experts that transformers 5 fuses (Qwen2-MoE) is loaded by GPTQModel itself: its
    routed experts are 3-D parameters, so transformers' GPTQ loader finds no module for the
    per-expert quantized tensors and would leave the experts uninitialised; GPTQModel unfuses them
    into per-expert Linears. XVERSE-MoE's class (xquant/models) has those Linears already."""

    engine = "transformers + optimum/gptqmodel"

    def _load(self, auto):
        try:
            import gptqmodel  # noqa: F401
            import optimum  # noqa: F401
        except ImportError:
            return self._dequantized(auto)
        from ..arch import for_config

        arch = for_config(json.loads((self.path / "config.json").read_text()))
        # A class holding one nn.Linear per routed expert (xquant's own, `[quant] experts`) loads
        # through transformers' GPTQ quantizer like a dense model.
        if arch.is_moe and not arch.quant.experts:
            from gptqmodel import GPTQModel

            self.engine = "gptqmodel (GPTQModel.load, per-expert modules)"
            dtype = torch.float32 if self.device == "cpu" else torch.float16
            return GPTQModel.load(str(self.path), device=self.device, dtype=dtype).model
        return auto.from_pretrained(self.path, device_map=self.device)

    def _dequantized(self, auto):
        from .gptq_reference import load_dequantized

        self.engine = "xquant dequantized reference (no GPTQ loader installed)"
        return load_dequantized(self.path, device=self.device)


@register("gguf")
class GGUFRuntime(Runtime):
    engine = "llama.cpp (llama-cpp-python)"

    def __init__(self, path: Path, device: str = "cpu", n_ctx: int | None = None):
        super().__init__(path, device)
        _require("llama_cpp", "evaluating a GGUF artifact", "llamacpp")
        from gguf import GGUFReader

        from ..gguf.kquant import load_llama

        ctx_len = None
        reader = GGUFReader(path)
        for field in reader.fields.values():
            if field.name.endswith(".context_length"):
                ctx_len = int(field.parts[field.data[0]][0])
        del reader
        self._ctx = n_ctx or ctx_len or 2048
        self.llm = load_llama(path, n_ctx=self._ctx, n_gpu_layers=-1 if device == "cuda" else 0, seed=0)

    def encode(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=self.llm._model.add_bos_token(), special=False)

    def logits(self, ids: list[int]) -> torch.Tensor:
        self.llm.reset()
        self.llm.eval(ids)
        import numpy as np

        return torch.from_numpy(np.array(self.llm.scores[: len(ids)], dtype=np.float32))

    @property
    def context(self) -> int:
        return self._ctx

    def close(self) -> None:
        self.llm.close()


def _require(module: str, purpose: str, extra: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependencyError(module.replace("_", "-"), purpose, extra) from None


def known_kinds() -> list[str]:
    return sorted(_RUNTIMES)
