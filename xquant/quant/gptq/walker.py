"""Layer streaming for GPTQ: one decoder layer in memory at a time, read from disk.

The calibration batch is embedded once. Then, per decoder layer: its tensors are read from the
checkpoint (names from the architecture registry), one transformers decoder layer is built on
the device around them, forward hooks on its linears accumulate each one's Hessian
H = 2/n Σ xxᵀ, the linears are quantized in the registry's true-sequential groups (a later
group sees inputs computed with the earlier groups already quantized), and finally the layer's
outputs are recomputed with all its weights quantized: those are the next layer's inputs.

The transformers classes are data too: an architecture's TOML may name them in a [gptq]
section (config_class, decoder_layer, rotary_embedding); LLaMA's are the default. A [gptq]
`sequential` overrides the registry's groups (a mixture of experts lists "experts.gate" etc.: that
role of every routed expert; moe.py swaps the fused experts for per-expert Linears). A routed
expert that the router sent fewer than `min_expert_tokens` calibration tokens is rounded to
nearest instead: a Hessian from a handful of tokens fits those tokens, not the expert.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ...arch import Architecture
from ...commands.gptq_options import MIN_EXPERT_TOKENS  # the option's default, defined with the option
from ...errors import ShapeError, UnsupportedError
from ...io.dtypes import FLOAT_DTYPES
from ...io.readers import TensorReader
from .core import SMALL_COLUMNS, QuantizedWeight, QuantSpec, gptq_quantize, rtn_quantize, single_thread
from .moe import EXPERT_PREFIX, unfuse_experts
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

    role: str  # a registry role ("q"), or "experts.<e>.<role>" for a routed expert's linear
    weight: str  # e.g. model.layers.3.self_attn.q_proj.weight
    module: str  # e.g. self_attn.q_proj
    bias: str | None = None
    expert: int | None = None  # the routed expert's index

    @property
    def prefix(self) -> str:
        return self.weight.removesuffix(".weight")


def sequential(arch: Architecture) -> tuple[tuple[str, ...], ...]:
    """The true-sequential groups GPTQ uses: `[gptq] sequential` when the TOML has one (it may
    differ from int8/NF4's [quant] list: a MoE keeps its 1-row shared-expert gate in float), else
    the registry's."""
    return arch.gptq.sequential or arch.sequential


def layer_groups(arch: Architecture, reader: TensorReader, i: int, config: dict | None = None
                 ) -> list[list[LinearRef]]:
    """The quantized linears of decoder layer i, in true-sequential groups (routed experts expanded)."""
    head = f"{arch.layers_module}.{i}."
    experts: dict[str, list[str]] | None = None

    def ref(role: str, name: str, expert: int | None = None) -> LinearRef:
        if name not in reader:
            raise ShapeError(f"{reader.root}: decoder layer {i} has no '{name}' (role '{role}')")
        if not (name.startswith(head) and name.endswith(".weight")):
            raise UnsupportedError(f"{name}: a quantized linear must be '<layer>.<module>.weight'")
        bias = name.removesuffix(".weight") + ".bias"
        return LinearRef(role, name, name[len(head):-len(".weight")], bias if bias in reader else None, expert)

    groups = []
    for group in sequential(arch):
        refs = []
        for role in group:
            if not role.startswith(EXPERT_PREFIX):
                refs.append(ref(role, arch.layer_tensor(role, i)))
                continue
            if experts is None:
                experts = arch.expert_tensors(i, config or {})
            sub = role[len(EXPERT_PREFIX):]
            if sub not in experts:
                raise UnsupportedError(f"{arch.name}: [gptq] sequential names '{role}' but [experts] has no '{sub}'")
            refs += [ref(f"{EXPERT_PREFIX}{e}.{sub}", name, e) for e, name in enumerate(experts[sub])]
        groups.append(refs)
    return groups


def layer_linears(arch: Architecture, reader: TensorReader, i: int, config: dict | None = None) -> list[LinearRef]:
    """The quantized linears of decoder layer i, in true-sequential order."""
    return [r for group in layer_groups(arch, reader, i, config) for r in group]


@dataclass
class LayerResult:
    tensors: dict[str, torch.Tensor]  # output name -> packed tensor (qweight/qzeros/scales/g_idx/bias)
    outputs: torch.Tensor  # the next layer's inputs
    stats: dict[str, Any] = field(default_factory=dict)


class StoredLinear(nn.Module):
    """A decoder layer's linear that stays compact between forwards: in the checkpoint's dtype
    until it is quantized, then as its packed codes (the checkpoint's qweight; one byte per code for
    3 bits, whose fields straddle words) with their scales and zeros. Each forward
    makes the float32 weight, uses it and drops it, so one layer of a 70B model costs its bytes on
    disk rather than twice that in float32, and only the linear being quantized is float32 for
    long. The float32 weight is the same as a float32 Linear's (the exact cast, or the core's own
    dequantization product, laid out with the core's strides), so the outputs are too."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.stored: torch.Tensor | None = weight
        self.bias = bias
        self.quantized: tuple | None = None  # (codes or qweight, bits, scales, zeros, g_idx, the core's strides)

    @property
    def weight(self) -> torch.Tensor:
        return self.float_weight()

    def float_weight(self, rows: int = 1024) -> torch.Tensor:
        if self.quantized is None:
            if self.stored is None:
                raise RuntimeError("the weight was handed to the quantizer and not replaced")
            return self.stored.to(torch.float32)
        codes, bits, scales, zeros, g_idx, stride = self.quantized
        shape = (self.out_features, self.in_features)
        out = torch.empty_strided(shape, stride, dtype=torch.float32, device=scales.device)
        g = g_idx.long()
        for r in range(0, shape[0], rows):  # a block of rows at a time: no full-size temporaries
            s, z = scales[g, r:r + rows].float().t(), zeros[g, r:r + rows].float().t()
            torch.mul(s, _codes(codes, bits, r, r + rows) - z, out=out[r:r + rows])
        return out

    def take_weight(self) -> torch.Tensor:
        """The stored weight, handed over (to the quantizer): the module keeps no reference."""
        w, self.stored = self.stored, None
        return w

    def set_quantized(self, qw: QuantizedWeight, qweight: torch.Tensor, bits: int, device: torch.device) -> None:
        """Keep the quantized weight as `qweight` (v1 packing: [in·bits/32, out] int32 words), or as
        qw's codes for 3 bits; the float32 weight of later forwards is the core's `qw.weight`."""
        self.stored = None
        codes = qw.codes if 32 % bits else qweight
        self.quantized = (codes.to(device), bits, qw.scales.to(device), qw.zeros.to(device), qw.g_idx.to(device),
                          qw.weight.stride())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.float_weight(), self.bias)


def _codes(codes: torch.Tensor, bits: int, r0: int, r1: int) -> torch.Tensor:
    """Float codes of output rows r0..r1 [rows, in]: from uint8 codes, or unpacked from qweight
    words (field k of a word holds bits k·bits..(k+1)·bits-1, see pack.py)."""
    if codes.dtype == torch.uint8:
        return codes[r0:r1].float()
    words = codes[:, r0:r1]  # [in·bits/32, rows]
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=words.device)
    fields = (words[:, None, :] >> shifts[None, :, None]) & (2 ** bits - 1)  # [in·bits/32, 32/bits, rows]
    return fields.reshape(-1, words.shape[1]).t().float()


def _compact_linears(layer: nn.Module) -> None:
    """Swap every nn.Linear of the layer for a StoredLinear holding the same tensors."""
    for name, module in list(layer.named_modules()):
        if type(module) is nn.Linear:
            bias = None if module.bias is None else module.bias.data
            layer.set_submodule(name, StoredLinear(module.weight.data, bias))


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
                 true_sequential: bool = True, device: str = "cpu", act_dtype: torch.dtype = torch.float32,
                 min_expert_tokens: int = MIN_EXPERT_TOKENS):
        classes = {k: getattr(arch.gptq, k) or v for k, v in LLAMA_CLASSES.items()}
        cfg_dict = {k: v for k, v in config.items() if k != "quantization_config"}
        self.config_dict = cfg_dict
        self.min_expert_tokens = min_expert_tokens
        self.config = _import(classes["config_class"])(**cfg_dict)
        self.config._attn_implementation = "sdpa"  # causal via is_causal, without a mask tensor
        self.layer_cls = _import(classes["decoder_layer"])
        self.rotary = _import(classes["rotary_embedding"])(self.config).to(device)
        self.arch, self.reader, self.spec = arch, reader, spec
        self.true_sequential = true_sequential
        self.device = torch.device(device)
        self.act_dtype = act_dtype
        self._skip = tuple(t.split("{i}.", 1)[-1] for t in arch.derived.values())

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
        """Decoder layer i on the device: its linears as StoredLinear (weights in the checkpoint's
        dtype, float32 only while used), every other tensor in float32."""
        head = f"{self.arch.layers_module}.{i}."
        names = [n for n in self.reader.names() if n.startswith(head) and not n.endswith(self._skip)]
        with torch.device("meta"):
            layer = self.layer_cls(self.config, i)
        unfuse_experts(layer, self.arch, self.config_dict, self.reader, i)  # MoE: per-expert Linears
        expected = set(layer.state_dict())
        linear_weights = {f"{n}.weight" for n, m in layer.named_modules() if type(m) is nn.Linear}
        state = {}
        for name in names:
            key = name[len(head):]
            if key not in expected:
                raise ShapeError(f"{name}: not a parameter of {self.layer_cls.__name__} (config.json disagrees with the weights?)")
            t = self.reader.get(name)
            if t.dtype not in FLOAT_DTYPES:
                raise ShapeError(f"{name}: dtype {t.dtype} is not floating point; is the model already quantized?")
            state[key] = t.to(self.device) if key in linear_weights else t.to(self.device, torch.float32)
        missing = sorted(expected - set(state))
        if missing:
            raise ShapeError(f"{self.reader.root}: decoder layer {i} lacks '{head}{missing[0]}'")
        try:
            layer.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as e:
            raise ShapeError(f"{self.reader.root}: decoder layer {i} does not match config.json "
                             f"({str(e).splitlines()[-1].strip()})") from None
        _compact_linears(layer)
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
    def collect(self, layer, inputs: torch.Tensor, modules: dict[str, torch.nn.Module]
                ) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """(role -> H = 2/n Σ xxᵀ, role -> n) over the inputs reaching each module, running the
        layer only as far as the last of them (the rest of the forward pass is not needed). A
        routed expert the router never chose has no entry in either."""
        hooks = _Hessians(modules, stop_early=True)
        try:
            self.forward_all(layer, inputs, None, hooks)
        finally:
            hooks.remove()
        made: dict[int, torch.Tensor] = {}  # linears sharing an input share one H
        out, counts = {}, {}
        for role in modules:
            acc = hooks.sums.get(role)
            if acc is None:
                continue
            if id(acc) not in made:
                made[id(acc)] = acc[0].mul_(2.0 / acc[1])
            out[role], counts[role] = made[id(acc)], acc[1]
        return out, counts

    def collect_hessians(self, layer, inputs: torch.Tensor, modules: dict[str, torch.nn.Module]
                         ) -> dict[str, torch.Tensor]:
        """role -> H = 2/n Σ xxᵀ of the inputs reaching each module."""
        return self.collect(layer, inputs, modules)[0]

    @torch.inference_mode()
    def run_layer(self, i: int, inputs: torch.Tensor) -> LayerResult:
        """Quantize decoder layer i given its inputs; returns its packed tensors and outputs.

        A narrow layer runs on one CPU thread throughout, forward passes included: its matmuls
        ([4096 tokens, 256] x [256, 768] for the tiny models) last well under a millisecond per
        thread, so the threads' wake-ups and barriers cost more than they share, and much more on
        a machine whose cores are busy with something else. Layers as wide as 7B's keep every
        thread. On CUDA the peak device memory of the layer is recorded in its stats."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        with single_thread(self.device, small=self.config.hidden_size <= SMALL_COLUMNS):
            result = self._run_layer(i, inputs)
        if self.device.type == "cuda":
            result.stats["peak_device_bytes"] = int(torch.cuda.max_memory_allocated(self.device))
        return result

    def _run_layer(self, i: int, inputs: torch.Tensor) -> LayerResult:
        t0 = time.perf_counter()
        groups = layer_groups(self.arch, self.reader, i, self.config_dict)
        if not self.true_sequential:
            groups = [[ref for group in groups for ref in group]]
        layer = self.load_layer(i)
        tensors: dict[str, torch.Tensor] = {}
        stats: dict[str, Any] = {"layer": i, "linears": {}}
        experts: dict[int, dict[str, Any]] = {}  # expert -> {"tokens", "rtn", "loss"}
        for group in groups:
            modules = {ref.role: layer.get_submodule(ref.module) for ref in group}
            hessians, counts = self.collect(layer, inputs, modules)
            for ref in group:
                module = modules[ref.role]
                t1 = time.perf_counter()
                H = hessians.pop(ref.role, None)
                if ref.expert is not None:
                    e = experts.setdefault(ref.expert, {"tokens": counts.get(ref.role, 0), "rtn": False, "loss": 0.0})
                    # Decided on the expert's first group and kept for its other linears (the
                    # routing, hence the count, is the same for both groups).
                    e["rtn"] = e["rtn"] or H is None or e["tokens"] < self.min_expert_tokens
                    if e["rtn"]:
                        qw = rtn_quantize(module.take_weight(), self.spec)
                        e["loss"] = None
                        H = None
                if H is not None:
                    # The last linear using this H (q/k/v share one) hands it over: worked on in place.
                    owned = all(h is not H for h in hessians.values())
                    qw = gptq_quantize(module.take_weight(), H, self.spec, ref.weight, owned=owned)
                del H
                packed = pack_linear(qw, self.spec.bits)
                module.set_quantized(qw, packed["qweight"], self.spec.bits, self.device)
                for suffix, t in packed.items():
                    tensors[f"{ref.prefix}.{suffix}"] = t
                if ref.bias is not None:
                    tensors[ref.bias] = module.bias.to("cpu", torch.float16)
                if ref.expert is None:
                    stats["linears"][ref.role] = {"loss": round(qw.loss, 6), "damp": qw.damp,
                                                  "seconds": round(time.perf_counter() - t1, 3)}
                elif experts[ref.expert]["loss"] is not None:
                    experts[ref.expert]["loss"] = round(experts[ref.expert]["loss"] + qw.loss, 6)
                del qw
        if experts:
            # Per routed expert: calibration tokens routed to it, and whether it was rounded to nearest.
            stats["experts"] = [experts[e] for e in sorted(experts)]
        outputs = torch.empty_like(inputs)
        self.forward_all(layer, inputs, outputs)
        del layer
        stats["seconds"] = round(time.perf_counter() - t0, 3)
        return LayerResult(tensors, outputs, stats)
