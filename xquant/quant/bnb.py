"""`xquant int8` / `xquant nf4`: bitsandbytes checkpoints written tensor by tensor, no model built.

The output is what transformers + bitsandbytes write with `save_pretrained` after loading a model
with `BitsAndBytesConfig(load_in_8bit=True)` or `(load_in_4bit=True, bnb_4bit_quant_type="nf4")`,
so `AutoModelForCausalLM.from_pretrained(OUT)` loads it with no extra argument:

- LLM.int8, per quantized linear `X`: `X.weight` int8 [out, in], `X.SCB` float32 [out] (row absmax)
  and `X.weight_format` uint8 scalar 0 ("row").
- NF4, per quantized linear `X`: `X.weight` uint8 [numel/2, 1] (two codes a byte), `X.weight.absmax`
  (float32 per block of 64, or uint8 when double-quantized, with `X.weight.nested_absmax` and
  `X.weight.nested_quant_map`), `X.weight.quant_map` (the 16 NF4 levels) and
  `X.weight.quant_state.bitsandbytes__nf4` (the JSON of quant type, block size, dtype, shape and
  nested parameters, as uint8 bytes).
- Everything else is copied in the model dtype (the config's dtype, as transformers loads it);
  config.json gains `quantization_config` as transformers writes it.

Which linear layers stay in high precision follows transformers: by default the output embedding
(`lm_head`); a `--skip-modules` list replaces the default, with transformers' matching (a prefix up to
a module boundary, a regular expression, or a suffix) and is recorded in the config.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import torch

from ..convert.hf import SIDE_FILES
from ..errors import InputError, ShapeError, UnsupportedError
from ..io.dtypes import USER_DTYPES, dtype_name, parse_dtype, parse_size
from ..io.finite import check_finite, check_result
from ..io.output import Provenance
from ..io.writer import TensorSpec
from ..model import HFModel, detect, open_hf
from ..pipeline import Plan, TensorJob
from . import bnb_core as core

QUANTIZABLE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FP16_MAX = 65504.0
# Buffers old checkpoints carry that transformers neither loads nor saves.
DROPPED_SUFFIXES = ("rotary_emb.inv_freq",)
# A typical `nested_offset` spelling, used to size the NF4 quant-state record in a dry run only.
_OFFSET_PLACEHOLDER = 0.012345678901234567


# ---------------------------------------------------------------- what to quantize

def should_skip(module: str, patterns: list[str]) -> bool:
    """transformers' rule: a pattern matches from the start up to a module boundary (as a regular
    expression), or as a suffix of the module name."""
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    return any(re.match(rf"(?:{p}){boundary}", module) or module.endswith(p) for p in patterns)


def parse_skip_modules(skip: str | list[str] | None) -> list[str] | None:
    """'lm_head, model.layers.0' -> ['lm_head', 'model.layers.0']; None keeps transformers' default,
    an empty string skips nothing."""
    if skip is None or isinstance(skip, list):
        return skip
    return [p.strip() for p in skip.split(",") if p.strip()]


def _check_patterns(patterns: list[str]) -> None:
    for p in patterns:
        try:
            re.compile(p)
        except re.error as e:
            raise UnsupportedError(f"--skip-modules: '{p}' is not a valid pattern ({e})") from None


def linear_modules(model: HFModel) -> list[str]:
    """Module names of every linear layer the architecture declares (decoder projections, then the
    output embedding when the checkpoint has one); a declared layer weight that is missing fails."""
    arch = model.arch
    reader = model.tensors
    names = []
    # Read directly: a model with 0 layers must say "nothing to quantize", not fail on a missing count.
    layers = model.config.get("num_hidden_layers", model.config.get("n_layers"))
    if not isinstance(layers, int) or layers < 0:
        raise InputError(f"{model.path}/config.json: no valid num_hidden_layers ({layers!r})")
    for i in range(layers):
        for role in arch.linear_roles():
            name = arch.layer_tensor(role, i)
            if name not in reader:
                raise InputError(f"{model.path}: tensor '{name}' ({role} of layer {i}) is missing")
            names.append(name)
        if arch.quant.experts:  # routed experts held as one nn.Linear each by the model class
            for e, triple in enumerate(zip(*arch.expert_tensors(i, model.config).values())):
                for name in triple:
                    if name not in reader:
                        raise InputError(f"{model.path}: tensor '{name}' (routed expert {e} of layer {i}) is missing")
                    names.append(name)
    head = arch.globals.get("lm_head")
    if head and head in reader:
        names.append(head)
    return [n.removesuffix(".weight") for n in names]


def default_skips(model: HFModel) -> list[str]:
    """transformers keeps the output embedding (and tied embeddings) in high precision."""
    arch = model.arch
    skips = [arch.globals["lm_head"].removesuffix(".weight")] if "lm_head" in arch.globals else []
    if model.config.get("tie_word_embeddings") and "embed" in arch.globals:
        skips.append(arch.globals["embed"].removesuffix(".weight"))
    return skips


def model_dtype(model: HFModel, names: list[str]) -> torch.dtype:
    """The dtype transformers loads the model in: the config's, else the first weight's."""
    declared = model.config.get("dtype") or model.config.get("torch_dtype")
    if isinstance(declared, str) and declared.lower() in USER_DTYPES:
        return parse_dtype(declared)
    return model.tensors.info(names[0] + ".weight").dtype


# ---------------------------------------------------------------- transformers' quantization_config

def quantization_config(bits: int, threshold: float = 6.0, skip_modules: list[str] | None = None,
                        compute_dtype: str = "float32", double_quant: bool = False) -> dict[str, Any]:
    """`quantization_config` exactly as transformers writes it for BitsAndBytesConfig."""
    return {
        "_load_in_4bit": bits == 4,
        "_load_in_8bit": bits == 8,
        "bnb_4bit_compute_dtype": compute_dtype,
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": "nf4" if bits == 4 else "fp4",
        "bnb_4bit_use_double_quant": double_quant,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": skip_modules,
        "llm_int8_threshold": threshold,
        "load_in_4bit": bits == 4,
        "load_in_8bit": bits == 8,
        "quant_method": "bitsandbytes",
    }


def quant_state_json(shape: tuple[int, ...], dtype: torch.dtype, nested_offset: float | None) -> bytes:
    """The NF4 quant-state record: bitsandbytes' non-tensor fields, JSON-encoded with json.dumps."""
    record: dict[str, Any] = {"quant_type": "nf4", "blocksize": core.NF4_BLOCKSIZE,
                              "dtype": dtype_name(dtype), "shape": list(shape)}
    if nested_offset is not None:
        record.update({"nested_blocksize": core.NESTED_BLOCKSIZE, "nested_dtype": "float32",
                       "nested_offset": nested_offset})
    return json.dumps(record).encode("utf-8")


# ---------------------------------------------------------------- per-module producers

class _Outputs:
    """Quantizes one weight when its first output is requested and hands the outputs out one by
    one, so a module's tensors cost one read and one quantization and are freed once written."""

    def __init__(self, compute: Callable[[], dict[str, torch.Tensor]]):
        self._compute = compute
        self._ready: dict[str, torch.Tensor] | None = None

    def take(self, key: str) -> Callable[[], torch.Tensor]:
        def produce() -> torch.Tensor:
            if self._ready is None:
                self._ready = self._compute()
            return self._ready.pop(key)

        return produce


def _load_weight(model: HFModel, name: str, dtype: torch.dtype, fp16_only: bool) -> torch.Tensor:
    """The source weight in the model dtype, checked: 2-D, finite, and within float16 for int8."""
    info = model.tensors.info(name)
    w = model.tensors.get(name).to(dtype)
    if w.dim() != 2:
        raise ShapeError(f"{info.file}: tensor '{name}' has shape {list(w.shape)}; a linear weight is 2-D")
    check_finite(name, w, info.file)  # io/finite.py: the one NaN/inf rule (before the range test below)
    lo, hi = (float(v) for v in torch.aminmax(w))
    if fp16_only and max(-lo, hi) > FP16_MAX:
        raise UnsupportedError(f"{info.file}: tensor '{name}' has values beyond float16's range "
                               f"(±{FP16_MAX:.0f}), which LLM.int8 quantizes from")
    return w


def _int8_jobs(model: HFModel, module: str, dtype: torch.dtype, group: int | None) -> list[TensorJob]:
    name = module + ".weight"
    rows, cols = model.tensors.info(name).shape

    def compute() -> dict[str, torch.Tensor]:
        q, scb = core.int8_rows(_load_weight(model, name, dtype, fp16_only=True))
        return {"weight": q, "SCB": scb, "weight_format": torch.tensor(0, dtype=torch.uint8)}

    out = _Outputs(compute)
    src = dtype_name(model.tensors.info(name).dtype)
    return [
        TensorJob(TensorSpec(name, (rows, cols), torch.int8), out.take("weight"), group, f"{src} -> int8 rows"),
        TensorJob(TensorSpec(module + ".SCB", (rows,), torch.float32), out.take("SCB"), group, "row absmax"),
        TensorJob(TensorSpec(module + ".weight_format", (), torch.uint8), out.take("weight_format"), group,
                  "0 = row-major"),
    ]


def _nf4_jobs(model: HFModel, module: str, dtype: torch.dtype, group: int | None,
              double_quant: bool) -> list[TensorJob]:
    name = module + ".weight"
    shape = tuple(model.tensors.info(name).shape)
    numel = shape[0] * shape[1]  # 2-D: checked by _select
    blocks = -(-numel // core.NF4_BLOCKSIZE)
    state_key = "quant_state.bitsandbytes__nf4"
    # With double quantization the record holds the absmax mean, so its length is known only once
    # the weight is read: it is sized with a typical spelling here, and NF4Plan.prepare measures it.
    estimated = double_quant
    state_len = len(quant_state_json(shape, dtype, _OFFSET_PLACEHOLDER if double_quant else None))

    def compute() -> dict[str, torch.Tensor]:
        packed, absmax = core.nf4_blocks(_load_weight(model, name, dtype, fp16_only=False))
        outputs = {"weight": packed, "quant_map": core.nf4_levels()}
        nested_offset = None
        if double_quant:
            qabsmax, nested, mean = core.double_quantize(absmax)
            nested_offset = mean.item()
            outputs.update({"absmax": qabsmax, "nested_absmax": nested,
                            "nested_quant_map": core.dynamic_map()})
        else:
            outputs["absmax"] = absmax
        record = quant_state_json(shape, dtype, nested_offset)
        outputs[state_key] = torch.frombuffer(bytearray(record), dtype=torch.uint8)
        return outputs

    out = _Outputs(compute)
    src = dtype_name(model.tensors.info(name).dtype)
    specs = [(name, ((numel + 1) // 2, 1), torch.uint8, "weight", f"{src} -> nf4 (2 per byte)")]
    if double_quant:
        specs += [
            (name + ".absmax", (blocks,), torch.uint8, "absmax", "block absmax, 8-bit"),
            (name + ".nested_absmax", (-(-blocks // core.NESTED_BLOCKSIZE),), torch.float32, "nested_absmax",
             "absmax of absmax"),
            (name + ".nested_quant_map", (256,), torch.float32, "nested_quant_map", "dynamic 8-bit code"),
        ]
    else:
        specs.append((name + ".absmax", (blocks,), torch.float32, "absmax", "block absmax"))
    specs += [
        (name + ".quant_map", (16,), torch.float32, "quant_map", "NF4 levels"),
        (f"{name}.{state_key}", (state_len,), torch.uint8, state_key,
         "JSON (size measured before writing)" if estimated else "JSON"),
    ]
    return [TensorJob(TensorSpec(n, s, d), out.take(k), group, why) for n, s, d, k, why in specs]


def _copy_job(model: HFModel, name: str, dtype: torch.dtype, group: int | None) -> TensorJob:
    info = model.tensors.info(name)
    out_dtype = dtype if info.dtype.is_floating_point else info.dtype

    def produce() -> torch.Tensor:
        src = model.tensors.get(name)
        out = src.to(out_dtype)
        check_result(name, out, [(info.file, src)])  # io/finite.py: kept tensors follow the same rule
        return out

    return TensorJob(TensorSpec(name, info.shape, out_dtype), produce, group, f"{dtype_name(info.dtype)} (kept)")


# ---------------------------------------------------------------- plans

def _open(src: Path, command: str) -> HFModel:
    if detect(src) != "hf":
        raise InputError(f"{src}: `xquant {command}` takes a Hugging Face directory "
                         f"(run `xquant convert` on a Meta checkpoint first)")
    model = open_hf(src)
    if model.quantization:
        raise UnsupportedError(f"{src}/config.json: the model is already quantized "
                               f"({model.quantization.get('quant_method', '?')}); "
                               f"{command} takes an unquantized float checkpoint")
    return model


def _select(model: HFModel, skip_modules: list[str] | None, command: str) -> tuple[list[str], list[str]]:
    """(modules to quantize, linear modules kept) after the skip rule; fails when none is left."""
    patterns = default_skips(model) if skip_modules is None else skip_modules
    _check_patterns(patterns)
    linears = linear_modules(model)
    quantized = [m for m in linears if not should_skip(m, patterns)]
    kept = [m for m in linears if m not in quantized]
    if not quantized:
        what = f"all {len(linears)} are skipped" if linears else "the checkpoint has none"
        raise UnsupportedError(f"{model.path}: no linear layers to quantize ({what}; "
                               f"skipped: {', '.join(patterns) or '-'})")
    for m in quantized:
        info = model.tensors.info(m + ".weight")
        if len(info.shape) != 2:
            raise ShapeError(f"{info.file}: tensor '{info.name}' has shape {list(info.shape)}; "
                             f"a linear weight is 2-D")
        if info.dtype not in QUANTIZABLE_DTYPES:
            raise UnsupportedError(f"{info.file}: tensor '{info.name}' is {dtype_name(info.dtype)}, not floating "
                                   f"point; {command} needs float16, bfloat16 or float32 weights")
    return quantized, kept


def _nested_offsets(model: HFModel, modules: list[str], dtype: torch.dtype) -> dict[str, float]:
    """Each weight's mean NF4 block absmax, read up front: double quantization stores it in the
    quant-state JSON, whose byte length the writer must know before the first tensor is written."""
    offsets = {}
    arch = model.arch
    current = None
    for m in modules:
        group = arch.layer_of(m + ".weight")
        if group != current:
            model.tensors.release()
            current = group
        w = _load_weight(model, m + ".weight", dtype, fp16_only=False)
        offsets[m] = core.nf4_absmax(w).mean().item()
        del w
    model.tensors.release()
    return offsets


def _build(model: HFModel, out: Path, command: str, quantized: list[str], kept: list[str],
           dtype: torch.dtype, make_jobs, qconfig: dict[str, Any], options: dict[str, Any],
           max_shard_size: str, notes: list[str]) -> Plan:
    arch = model.arch
    wanted = {m + ".weight": m for m in quantized}
    jobs: list[TensorJob] = []
    dropped = []
    for name in model.tensors.names():
        group = arch.layer_of(name)
        if name in wanted:
            jobs += make_jobs(wanted[name], group)
        elif name.endswith(DROPPED_SUFFIXES):
            dropped.append(name)
        else:
            jobs.append(_copy_job(model, name, dtype, group))
    config = dict(model.config)
    config["quantization_config"] = qconfig
    src = model.path
    notes = [f"{len(quantized)} linear layers quantized; kept in {dtype_name(dtype)}: {', '.join(kept) or '-'}",
             *notes]
    if dropped:
        notes.append(f"dropped {len(dropped)} non-persistent buffers ({DROPPED_SUFFIXES[0]})")
    if arch.is_moe and arch.quant.experts:  # xquant's own class (xquant/models): experts are nn.Linear
        notes.append(f"routed experts quantized like the other linears (one nn.Linear each in the model class); "
                     f"router kept in {dtype_name(dtype)} (a plain parameter there)")
    elif arch.is_moe:  # mixture of experts: see converters/<arch>.toml, [quant] and [experts]
        notes.append(f"routed experts and router kept in {dtype_name(dtype)}: transformers holds them as "
                     f"parameters, not nn.Linear, so bitsandbytes does not quantize them")
    return Plan(
        title=f"{command} {src.name} -> {Path(out).name}",
        out=Path(out),
        jobs=jobs,
        max_shard_size=parse_size(max_shard_size),
        provenance=Provenance(command, options, [src]),
        json_files={"config.json": config},
        copy_files=[src / n for n in SIDE_FILES if (src / n).exists()] + model.tokenizer_files(),
        readers=[model.tensors],
        notes=notes,
    )


def plan_int8(src: Path, out: Path, threshold: float = 6.0, skip_modules: str | list[str] | None = None,
              max_shard_size: str = "5GB") -> Plan:
    """Plan an LLM.int8 artifact of the HF checkpoint `src` (transformers' `load_in_8bit` layout)."""
    if not threshold >= 0:
        raise UnsupportedError(f"--threshold must be >= 0, got {threshold}")
    model = _open(Path(src), "int8")
    skip_modules = parse_skip_modules(skip_modules)
    quantized, kept = _select(model, skip_modules, "int8")
    dtype = model_dtype(model, quantized)
    options = {"threshold": threshold, "skip_modules": skip_modules, "max_shard_size": max_shard_size}
    return _build(model, out, "int8", quantized, kept, dtype,
                  lambda m, g: _int8_jobs(model, m, dtype, g),
                  quantization_config(8, threshold=float(threshold), skip_modules=skip_modules),
                  options, max_shard_size,
                  [f"outlier threshold {threshold} (used at inference; weights are stored row-wise int8)"])


@dataclass
class NF4Plan(Plan):
    """An NF4 plan; with double quantization each quant-state record holds the weight's mean
    block absmax, whose spelling (and so the record's byte length, which the writer lays out
    before the first tensor) is known only from the weight. Planning stays pure: `prepare` (run by
    the executor before any output is opened) reads each quantized weight once and fixes those
    lengths; a dry run shows them sized with a typical spelling."""

    model: HFModel | None = None
    dtype: torch.dtype = torch.float32
    quantized: list[str] = field(default_factory=list)
    double_quant: bool = False

    def prepare(self, force: bool, resume: bool) -> None:
        super().prepare(force, resume)
        if not self.double_quant:
            return
        offsets = _nested_offsets(self.model, self.quantized, self.dtype)
        state = ".weight.quant_state.bitsandbytes__nf4"
        for job in self.jobs:
            if job.spec.name.endswith(state):
                module = job.spec.name.removesuffix(state)
                shape = tuple(self.model.tensors.info(module + ".weight").shape)
                size = len(quant_state_json(shape, self.dtype, offsets[module]))
                job.spec = TensorSpec(job.spec.name, (size,), torch.uint8)


def plan_nf4(src: Path, out: Path, compute_dtype: str | None = None, double_quant: bool = False,
             skip_modules: str | list[str] | None = None, max_shard_size: str = "5GB") -> NF4Plan:
    """Plan an NF4 artifact (transformers' `load_in_4bit`, quant type nf4, block size 64)."""
    compute = dtype_name(parse_dtype(compute_dtype)) if compute_dtype else "float32"
    model = _open(Path(src), "nf4")
    skip_modules = parse_skip_modules(skip_modules)
    quantized, kept = _select(model, skip_modules, "nf4")
    dtype = model_dtype(model, quantized)
    options = {"compute_dtype": compute, "double_quant": double_quant, "skip_modules": skip_modules,
               "max_shard_size": max_shard_size}
    notes = [f"compute dtype {compute}; double quantization {'on' if double_quant else 'off'}"]
    if double_quant:
        notes.append("quant-state sizes are estimates until run (each holds a mean computed from the weights)")
    plan = _build(model, out, "nf4", quantized, kept, dtype,
                  lambda m, g: _nf4_jobs(model, m, dtype, g, double_quant),
                  quantization_config(4, skip_modules=skip_modules, compute_dtype=compute,
                                      double_quant=double_quant),
                  options, max_shard_size, notes)
    return NF4Plan(**{f.name: getattr(plan, f.name) for f in fields(Plan)}, model=model, dtype=dtype,
                   quantized=quantized, double_quant=double_quant)
