"""Layer streaming for GPTQ: one decoder layer in memory at a time, read from disk.

The calibration batch is embedded once. Then, per decoder layer: its tensors are read from the
checkpoint (names from the architecture registry), one transformers decoder layer is built on
the device around them, forward hooks on its linears accumulate each one's Hessian
H = 2/n Σ xxᵀ, the linears are quantized in the registry's true-sequential groups (a later
group sees inputs computed with the earlier groups already quantized), and finally the layer's
outputs are recomputed with all its weights quantized: those are the next layer's inputs.

The transformers classes are data too: an architecture's TOML may name them in a [gptq]
section (config_class, decoder_layer, rotary_embedding); LLaMA's are the default.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ...arch import Architecture
from ...errors import ShapeError, UnsupportedError
from ...io.dtypes import FLOAT_DTYPES
from ...io.readers import TensorReader
from .core import QuantSpec, gptq_quantize
from .pack import pack_linear

LLAMA_CLASSES = {
    "config_class": "transformers.LlamaConfig",
    "decoder_layer": "transformers.models.llama.modeling_llama.LlamaDecoderLayer",
    "rotary_embedding": "transformers.models.llama.modeling_llama.LlamaRotaryEmbedding",
}
BATCH_TOKENS = 4096  # tokens per forward batch: bounds the attention / MLP working memory


def _import(dotted: str):
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


@dataclass
class LinearRef:
    """One quantized linear of a layer: its role, checkpoint name, and module path in the layer."""

    role: str
    weight: str  # e.g. model.layers.3.self_attn.q_proj.weight
    module: str  # e.g. self_attn.q_proj
    bias: str | None = None

    @property
    def prefix(self) -> str:
        return self.weight.removesuffix(".weight")


def layer_linears(arch: Architecture, reader: TensorReader, i: int) -> list[LinearRef]:
    """The quantized linears of decoder layer i, in true-sequential order."""
    head = f"{arch.layers_module}.{i}."
    refs = []
    for role in arch.linear_roles():
        name = arch.layer_tensor(role, i)
        if name not in reader:
            raise ShapeError(f"{reader.root}: decoder layer {i} has no '{name}' (role '{role}')")
        if not (name.startswith(head) and name.endswith(".weight")):
            raise UnsupportedError(f"{name}: a quantized linear must be '<layer>.<module>.weight'")
        bias = name.removesuffix(".weight") + ".bias"
        refs.append(LinearRef(role, name, name[len(head):-len(".weight")], bias if bias in reader else None))
    return refs


@dataclass
class LayerResult:
    tensors: dict[str, torch.Tensor]  # output name -> packed tensor (qweight/qzeros/scales/g_idx/bias)
    outputs: torch.Tensor  # the next layer's inputs
    stats: dict[str, Any] = field(default_factory=dict)


class _Stop(Exception):
    """Raised from a hook once every linear of the current group has seen its input."""


class _Hessians:
    """Forward pre-hooks that accumulate Σ xxᵀ per linear; linears fed the very same tensor
    (q/k/v, gate/up) share one accumulator, so it is computed once."""

    def __init__(self, modules: dict[str, torch.nn.Module], stop_early: bool):
        self.sums: dict[str, list] = {}  # role -> [Σ xxᵀ (float32), rows]
        self.stop_early = stop_early
        self._seen: set[str] = set()
        self._last: tuple[torch.Tensor, str] | None = None
        self._handles = [m.register_forward_pre_hook(self._hook(role)) for role, m in modules.items()]
        self._roles = set(modules)

    def _hook(self, role: str):
        def pre(_module, args):
            x = args[0]
            if self._last is not None and self._last[0] is x:
                self.sums[role] = self.sums[self._last[1]]
            else:
                x2 = x.reshape(-1, x.shape[-1]).to(torch.float32)
                acc = self.sums.get(role)
                if acc is None:
                    acc = self.sums[role] = [torch.zeros((x2.shape[1], x2.shape[1]), dtype=torch.float32,
                                                         device=x2.device), 0]
                acc[0].addmm_(x2.t(), x2)
                acc[1] += x2.shape[0]
                self._last = (x, role)
            self._seen.add(role)
            if self.stop_early and self._seen == self._roles:
                raise _Stop
        return pre

    def new_batch(self) -> None:
        self._seen.clear()
        self._last = None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


class LayerWalker:
    """Builds and runs one decoder layer at a time; knows nothing about files it writes."""

    def __init__(self, config: dict, arch: Architecture, reader: TensorReader, spec: QuantSpec,
                 true_sequential: bool = True, device: str = "cpu", act_dtype: torch.dtype = torch.float32):
        classes = {**LLAMA_CLASSES, **arch.extra.get("gptq", {})}
        cfg_dict = {k: v for k, v in config.items() if k != "quantization_config"}
        self.config = _import(classes["config_class"])(**cfg_dict)
        self.config._attn_implementation = "sdpa"  # causal via is_causal, without a mask tensor
        self.layer_cls = _import(classes["decoder_layer"])
        self.rotary = _import(classes["rotary_embedding"])(self.config).to(device)
        self.arch, self.reader, self.spec = arch, reader, spec
        self.true_sequential = true_sequential
        self.device = torch.device(device)
        self.act_dtype = act_dtype
        derived = arch.extra.get("derived", {})
        self._skip = tuple(t.split("{i}.", 1)[-1] for t in derived.values())

    # ------------------------------------------------------------ inputs

    def embed(self, windows: torch.Tensor) -> torch.Tensor:
        """Token windows [n, seq] -> the first layer's inputs [n, seq, hidden] (act dtype, CPU)."""
        table = self.reader.get(self.arch.globals["embed"])
        out = torch.nn.functional.embedding(windows, table).to(self.act_dtype)
        del table
        self.reader.release()
        return out

    def _batches(self, n: int, seq: int) -> list[slice]:
        step = max(1, BATCH_TOKENS // seq)
        return [slice(b, min(b + step, n)) for b in range(0, n, step)]

    # ------------------------------------------------------------ one layer

    def load_layer(self, i: int) -> torch.nn.Module:
        """Decoder layer i with its checkpoint tensors (float32) on the device."""
        head = f"{self.arch.layers_module}.{i}."
        names = [n for n in self.reader.names() if n.startswith(head) and not n.endswith(self._skip)]
        with torch.device("meta"):
            layer = self.layer_cls(self.config, i)
        expected = set(layer.state_dict())
        state = {}
        for name in names:
            key = name[len(head):]
            if key not in expected:
                raise ShapeError(f"{name}: not a parameter of {self.layer_cls.__name__} (config.json disagrees with the weights?)")
            t = self.reader.get(name)
            if t.dtype not in FLOAT_DTYPES:
                raise ShapeError(f"{name}: dtype {t.dtype} is not floating point; is the model already quantized?")
            state[key] = t.to(self.device, torch.float32)
        missing = sorted(expected - set(state))
        if missing:
            raise ShapeError(f"{self.reader.root}: decoder layer {i} lacks '{head}{missing[0]}'")
        try:
            layer.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as e:
            raise ShapeError(f"{self.reader.root}: decoder layer {i} does not match config.json "
                             f"({str(e).splitlines()[-1].strip()})") from None
        self.reader.release()
        return layer.eval()

    def forward_all(self, layer, inputs: torch.Tensor, outputs: torch.Tensor | None,
                    hooks: _Hessians | None = None) -> None:
        """Run `layer` over all calibration windows in batches (causal attention, rotary
        positions 0..seq-1), writing its outputs into `outputs` when given."""
        n, seq = inputs.shape[:2]
        pos = torch.arange(seq, device=self.device)[None]
        probe = torch.empty((), dtype=torch.float32, device=self.device)
        pos_emb = self.rotary(probe, pos)
        for sl in self._batches(n, seq):
            h = inputs[sl].to(self.device, torch.float32)
            if hooks is not None:
                hooks.new_batch()
            try:
                out = layer(h, attention_mask=None, position_ids=pos, position_embeddings=pos_emb)
            except _Stop:
                continue
            if outputs is not None:
                out = out[0] if isinstance(out, tuple) else out
                outputs[sl] = out.to("cpu", self.act_dtype)

    @torch.inference_mode()
    def collect_hessians(self, layer, inputs: torch.Tensor, modules: dict[str, torch.nn.Module]
                         ) -> dict[str, torch.Tensor]:
        """role -> H = 2/n Σ xxᵀ of the inputs reaching each module, running the layer only as
        far as the last of them (the rest of the forward pass is not needed)."""
        hooks = _Hessians(modules, stop_early=True)
        try:
            self.forward_all(layer, inputs, None, hooks)
        finally:
            hooks.remove()
        made: dict[int, torch.Tensor] = {}  # linears sharing an input share one H
        out = {}
        for role in modules:
            acc = hooks.sums[role]
            if id(acc) not in made:
                made[id(acc)] = acc[0] * (2.0 / acc[1])
            out[role] = made[id(acc)]
        return out

    @torch.inference_mode()
    def run_layer(self, i: int, inputs: torch.Tensor) -> LayerResult:
        """Quantize decoder layer i given its inputs; returns its packed tensors and outputs."""
        t0 = time.perf_counter()
        linears = {ref.role: ref for ref in layer_linears(self.arch, self.reader, i)}
        layer = self.load_layer(i)
        modules = {role: layer.get_submodule(ref.module) for role, ref in linears.items()}
        groups = list(self.arch.sequential) if self.true_sequential else [tuple(self.arch.linear_roles())]
        tensors: dict[str, torch.Tensor] = {}
        stats: dict[str, Any] = {"layer": i, "linears": {}}
        for group in groups:
            hessians = self.collect_hessians(layer, inputs, {r: modules[r] for r in group})
            for role in group:
                ref, module = linears[role], modules[role]
                t1 = time.perf_counter()
                qw = gptq_quantize(module.weight.data, hessians.pop(role), self.spec, ref.weight)
                module.weight.data = qw.weight.to(self.device)
                for suffix, t in pack_linear(qw, self.spec.bits).items():
                    tensors[f"{ref.prefix}.{suffix}"] = t
                if ref.bias is not None:
                    tensors[ref.bias] = module.bias.data.to("cpu", torch.float16)
                stats["linears"][role] = {"loss": round(qw.loss, 6), "damp": qw.damp,
                                          "seconds": round(time.perf_counter() - t1, 3)}
        outputs = torch.empty_like(inputs)
        self.forward_all(layer, inputs, outputs)
        del layer, modules
        stats["seconds"] = round(time.perf_counter() - t0, 3)
        return LayerResult(tensors, outputs, stats)
