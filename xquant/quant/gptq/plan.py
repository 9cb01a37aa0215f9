"""`xquant gptq`: options, validation, calibration windows and the output plan.

Everything a run needs is decided here, before any layer is quantized: the quantization spec,
the calibration windows (tokenized with the model's own tokenizer and sampled
deterministically), the list of output tensors (packed linears in the GPTQ v1 layout, every
other tensor copied), `quantize_config.json` and the `quantization_config` added to
config.json (GPTQModel's keys and values), and a memory estimate. `--dry-run` prints this plan;
`run.run_gptq` executes it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ... import __version__
from ...calib import load_set, sample_windows
from ...convert.hf import SIDE_FILES
from ...errors import InputError, UnsupportedError
from ...io.dtypes import FLOAT_DTYPES, dtype_name, human_bytes, parse_size
from ...io.output import Provenance
from ...io.writer import TensorSpec
from ...model import HFModel, open_hf
from ...pipeline import Plan, TensorJob
from .core import BITS, QuantSpec
from .pack import check_packable, packed_shapes
from .state import LayerFiles, state_dir_for
from .moe import experts_module
from .walker import BATCH_TOKENS, MIN_EXPERT_TOKENS, layer_linears
from ...commands.gptq_options import DEVICES, ENGINES, GPTQOptions  # noqa: F401 - the options live with the command

# Resident before any tensor: torch + transformers' modeling code + the tokenizer (measured 0.86 GiB).
GPTQ_BASE_MEMORY = 900 * 2**20


def quantize_config(o: GPTQOptions) -> dict[str, Any]:
    """quantize_config.json, also stored as config.json's quantization_config: the keys GPTQModel
    writes for a GPTQ v1 checkpoint; settings that only shaped the quantization go under meta."""
    return {
        "bits": o.bits,
        "group_size": o.group_size,
        "desc_act": o.desc_act,
        "lm_head": False,
        "method": "gptq",
        "quant_method": "gptq",
        "format": "gptq",
        "checkpoint_format": "gptq",
        "pack_dtype": "int32",
        "meta": {
            "quantizer": [f"xquant:{__version__}"],
            "damp_percent": o.damp,
            "static_groups": o.static_groups,
            "true_sequential": o.true_sequential,
            "mse": 0.0,
            "act_group_aware": o.group_aware,
        },
        "sym": o.sym,
    }


@dataclass
class Calibration:
    """Token windows [samples, seq_len] and where they came from."""

    windows: torch.Tensor
    sets: list[dict[str, Any]]
    tokens: int

    def fingerprint(self) -> dict[str, Any]:
        digest = hashlib.sha256(self.windows.to(torch.int64).numpy().tobytes()).hexdigest()
        return {"sets": self.sets, "tokens": self.tokens, "samples": int(self.windows.shape[0]),
                "seq_len": int(self.windows.shape[1]), "windows_sha256": digest}


def load_tokenizer(model: HFModel):
    if not (model.path / "tokenizer.json").exists() and not (model.path / "tokenizer.model").exists():
        raise InputError(f"{model.path}: no tokenizer (tokenizer.json or tokenizer.model); GPTQ calibration "
                         f"text is tokenized with the model's own tokenizer")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model.path)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds; the user needs one line
        raise InputError(f"{model.path}: cannot load the tokenizer ({type(e).__name__}: {e})") from None


def calibration_windows(model: HFModel, o: GPTQOptions) -> Calibration:
    """Tokenize the calibration sets (each document from BOS) and draw the windows."""
    tokenizer = load_tokenizer(model)
    ids: list[int] = []
    sets = []
    for spec in o.calibration:
        text_set = load_set(spec, "calib")
        n0 = len(ids)
        for doc in text_set.documents:
            ids.extend(tokenizer(doc, verbose=False)["input_ids"])
        sets.append({"name": text_set.name, "documents": len(text_set.documents),
                     "tokens": len(ids) - n0, "sha256": text_set.fingerprint()})
    source = "calibration " + " + ".join(s["name"] for s in sets)
    windows = sample_windows(ids, o.samples, o.seq_len, o.seed, source=source)
    return Calibration(torch.tensor(windows, dtype=torch.long), sets, len(ids))


@dataclass
class GPTQPlan(Plan):
    """A pipeline plan whose quantized tensors come from the layer walker's resume state."""

    model: HFModel | None = None
    options: GPTQOptions = field(default_factory=GPTQOptions)
    calibration: Calibration | None = None
    num_layers: int = 0
    layer_bytes: int = 0  # the largest decoder layer as stored
    act_dtype: torch.dtype = torch.float32
    quantized: set[str] = field(default_factory=set)  # source weights that are packed
    peak_estimate: int = 0
    experts: dict[str, Any] = field(default_factory=dict)  # mixture of experts: counts for the summary

    # Set while executing (see run.py): the resume state and when the run started.
    state: Any = field(default=None, repr=False)
    resumed_at: int | None = None
    started: float = 0.0

    def peak_memory_estimate(self) -> int:
        return self.peak_estimate

    # The executor's side (pipeline.execute): the layer walk before the output is opened.
    def prepare(self, force: bool, resume: bool) -> None:
        from .walk import walk

        walk(self, force, resume)

    def finished(self) -> None:
        self.state.remove()  # the artifact is complete: the layers are in it

    def abandon(self, interrupted: bool) -> None:
        """A failure leaves nothing, but an interruption (Ctrl-C) keeps the state `--resume` continues;
        a state this run resumed is kept too (it was there before, and is still valid)."""
        if self.state is not None and not interrupted and not self.resumed_at:
            self.state.remove()

    def result(self):
        from .walk import result

        return result(self)

    def summary(self) -> dict[str, Any]:
        o, c = self.options, self.calibration
        out = {
            "engine": o.engine,
            "quantization": f"{o.bits}-bit, group {o.group_size}, {'sym' if o.sym else 'asym'}"
                            f"{', act-order' if o.desc_act else ''}{', static groups' if o.static_groups else ''}"
                            f", damp {o.damp}, {'true-sequential' if o.true_sequential else 'one pass per layer'}",
            "calibration": f"{c.windows.shape[0]} x {c.windows.shape[1]} tokens from "
                           f"{' + '.join(s['name'] for s in c.sets)} ({c.tokens:,} tokens, seed {o.seed})",
            "decoder layers": f"{self.num_layers} (largest {human_bytes(self.layer_bytes)} on disk)",
            "quantized linears": len(self.quantized),
        }
        if self.experts:
            x = self.experts
            out["routed experts"] = (f"{x['per_layer']} per layer (top-{x['used']}), {x['linears']} linears; "
                                     f"round-to-nearest below {o.min_expert_tokens} routed calibration tokens")
            out["kept in the source dtype"] = ", ".join(x["kept"])
        return {**out, **super().summary()}

    def fingerprint(self) -> str:
        """Everything that shapes the quantized tensors: the resume state must match it."""
        files = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in self.model.tensors.files()]
        o = asdict(self.options)
        for k in ("device", "engine", "max_shard_size"):
            o.pop(k)
        blob = json.dumps({"files": files, "options": o, "calibration": self.calibration.fingerprint(),
                           "act_dtype": dtype_name(self.act_dtype), "xquant": __version__}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()


def _memory_estimate(model: HFModel, arch, o: GPTQOptions, act_dtype: torch.dtype, layer_bytes: int,
                     expert_shape: tuple[int, int] | None = None) -> int:
    """The peak of one decoder layer's walk, whatever the depth (measured against this in
    bench/gptq_shapes.py). Resident throughout: the base, the activations entering and leaving
    the layer, and the layer itself, which the walker keeps compact (walker.StoredLinear): the
    linears not yet quantized in the checkpoint's dtype, the others as packed codes. On top of
    that, while linear [out, in] is quantized, the largest of
      - its Hessians' collection: the group's Hessians, the linear's float32 weight and one
        batch of MLP activations;
      - the inverse Cholesky: H and its one factorisation buffer (2 · in² float32; the core
        permutes and factorises H in place) and W in float32;
      - the end of gptq_quantize: H (now holding the factor) and five [out, in] float32 tensors
        (the permuted weight, the codes, and the temporaries of the dequantized product).
    A mixture of experts holds one Hessian per routed expert of a group at once."""
    cfg, reader = model.config, model.tensors
    hidden = int(cfg["hidden_size"])
    widest = max(hidden, int(cfg.get("intermediate_size") or hidden))
    experts = 0
    if expert_shape is not None:
        experts = arch.expert_count(cfg) * max(expert_shape) ** 2 * 4
    act_size = torch.empty((), dtype=act_dtype).element_size()
    acts = o.samples * o.seq_len * hidden * act_size
    tokens = min(o.samples * o.seq_len, max(o.seq_len, BATCH_TOKENS // o.seq_len * o.seq_len))
    batch = tokens * widest * 4 * 4  # MLP gate, up, activation, product
    shapes = [(reader.info(r.weight).shape, reader.info(r.weight).nbytes) for r in layer_linears(arch, reader, 0, cfg)]
    codes_bytes = o.bits / 8 + (0 if 32 % o.bits == 0 else 1)  # qweight, and uint8 codes for 3 bits
    resident = layer_bytes - sum(n for _, n in shapes)  # norms and the like
    stored = [n for _, n in shapes]
    work = 0
    for k, ((out_f, in_f), nbytes) in enumerate(shapes):
        layer_now = sum(out * inp * codes_bytes for (out, inp), _ in shapes[:k]) + sum(stored[k:])
        h, w = in_f * in_f * 4, out_f * in_f * 4
        step = max(h + w + batch, 2 * h + w, h + 5 * w)
        work = max(work, layer_now + step)
    return int(GPTQ_BASE_MEMORY + 2 * acts + resident + work + experts)


def plan_gptq(src: Path, out: Path, options: GPTQOptions) -> GPTQPlan:
    """Validate everything and plan the artifact; raises a one-line error on bad input."""
    options.check()
    model = open_hf(Path(src))
    if model.quantization:
        raise UnsupportedError(f"{model.path / 'config.json'}: the model is already quantized "
                               f"({model.quantization.get('quant_method', '?')}); GPTQ needs the unquantized weights")
    arch = model.arch
    reader = model.tensors
    num_layers = arch.num_layers(model.config)
    moe = experts_module(arch) is not None
    if arch.is_moe and not moe:
        raise UnsupportedError(f"{model.path / 'config.json'}: {arch.name} has routed experts but its converter names "
                               f"no [gptq] experts_module, so xquant gptq cannot quantize them")
    if moe and options.engine == "optimum":
        raise UnsupportedError(f"--engine optimum: optimum's GPTQ cannot quantize {arch.hf_architectures[0]}'s routed "
                               f"experts (transformers fuses them into 3-D parameters); use --engine xquant")
    n_pos = model.config.get("max_position_embeddings")
    if n_pos and options.seq_len > int(n_pos):
        raise UnsupportedError(f"--seq-len {options.seq_len}: longer than the model's context "
                               f"(max_position_embeddings {n_pos} in {model.path / 'config.json'})")
    for name in arch.globals.values():
        if name in reader and reader.info(name).dtype not in FLOAT_DTYPES:
            raise UnsupportedError(f"{name}: dtype {reader.info(name).dtype} is not floating point; "
                                   f"is the model already quantized?")

    o = options
    outputs: dict[str, TensorSpec] = {}
    quantized: set[str] = set()
    layer_bytes = 0
    for i in range(num_layers):
        head = f"{arch.layers_module}.{i}."
        layer_bytes = max(layer_bytes, sum(reader.info(n).nbytes for n in reader.names() if n.startswith(head)))
        for ref in layer_linears(arch, reader, i, model.config):
            info = reader.info(ref.weight)
            if len(info.shape) != 2 or info.dtype not in FLOAT_DTYPES:
                raise UnsupportedError(f"{ref.weight}: expected a 2-D floating-point weight, found "
                                       f"{list(info.shape)} {dtype_name(info.dtype)} (already quantized?)")
            out_f, in_f = info.shape
            check_packable(ref.weight, out_f, in_f, o.bits, o.group_size)
            quantized.add(ref.weight)
            for suffix, (shape, dtype) in packed_shapes(out_f, in_f, o.bits, o.group_size).items():
                outputs[f"{ref.prefix}.{suffix}"] = TensorSpec(f"{ref.prefix}.{suffix}", shape, dtype)
            if ref.bias:
                outputs[ref.bias] = TensorSpec(ref.bias, reader.info(ref.bias).shape, torch.float16)

    calibration = calibration_windows(model, o)
    src_dtype = reader.info(arch.layer_tensor(arch.linear_roles()[0], 0)).dtype
    act_dtype = src_dtype if src_dtype in (torch.float16, torch.bfloat16) else torch.float32

    state_files = LayerFiles(state_dir_for(Path(out)))
    derived = tuple(t.split("{i}.", 1)[-1] for t in arch.derived.values())
    jobs: list[TensorJob] = []
    for name in reader.names():
        if derived and name.endswith(derived):
            continue  # buffers transformers recomputes (old rotary inv_freq)
        group = arch.layer_of(name)
        if name in quantized:
            prefix = name.removesuffix(".weight")
            for suffix in ("qweight", "qzeros", "scales", "g_idx"):
                out_name = f"{prefix}.{suffix}"
                jobs.append(TensorJob(outputs[out_name], state_files.producer(out_name, group), group,
                                      source=f"gptq {name}"))
        elif name in outputs:  # the bias of a quantized linear, stored in float16 as GPTQModel does
            jobs.append(TensorJob(outputs[name], state_files.producer(name, group), group,
                                  source=f"{name} (float16)"))
        else:
            info = reader.info(name)
            jobs.append(TensorJob(TensorSpec(name, info.shape, info.dtype), _copy(reader, name), group,
                                  source=f"copy {dtype_name(info.dtype)}"))

    qc = quantize_config(o)
    config = {**model.config, "quantization_config": qc}
    plan = GPTQPlan(
        title=f"gptq {model.path.name} -> {Path(out).name}",
        out=Path(out),
        jobs=jobs,
        max_shard_size=parse_size(o.max_shard_size),
        provenance=Provenance("gptq", asdict(o), [model.path],
                              extra={"calibration": calibration.fingerprint()}),
        json_files={"config.json": config, "quantize_config.json": qc},
        copy_files=[model.path / n for n in SIDE_FILES if (model.path / n).exists()] + model.tokenizer_files(),
        readers=[reader, state_files],
        model=model,
        options=o,
        calibration=calibration,
        num_layers=num_layers,
        layer_bytes=layer_bytes,
        act_dtype=act_dtype,
        quantized=quantized,
    )
    expert_shape = None
    if moe:
        spec = arch.experts
        expert_linears = {n for i in range(num_layers) for names in arch.expert_tensors(i, model.config).values()
                          for n in names} & quantized
        expert_shape = tuple(reader.info(arch.expert_tensors(0, model.config)["gate"][0]).shape)
        # 2-D layer weights left as they are: the router and the shared expert's 1-row gate.
        kept = sorted({n[len(f"{arch.layers_module}.{arch.layer_of(n)}."):] for n in reader.names()
                       if arch.layer_of(n) is not None and n.endswith(".weight") and n not in quantized
                       and len(reader.info(n).shape) == 2})
        plan.experts = {"per_layer": arch.expert_count(model.config), "used": model.config.get(spec.used),
                        "linears": len(expert_linears), "kept": kept}
        plan.notes.append("routed experts: each one's Hessian from the calibration tokens the router sends it; "
                          "the router and 1-row gates stay unquantized")
    plan.peak_estimate = _memory_estimate(model, arch, o, act_dtype, layer_bytes, expert_shape)
    plan.notes.append(f"activations kept in {dtype_name(act_dtype)}, layers computed in float32 on {o.device}")
    plan.notes.append(f"resume state (kept until the artifact is complete): {state_files.path}")
    return plan


def _copy(reader, name: str):
    return lambda: reader.get(name)
