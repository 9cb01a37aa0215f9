"""Importance matrices for llama.cpp's quantizer: computed from calibration text with the reference
model, saved and loaded in llama.cpp's imatrix format.

What an importance matrix is (llama.cpp tools/imatrix): for every linear layer (GGUF weight name),
the per-input-column sum of squared activations entering it, and how many activation rows (tokens)
were summed. The quantizer weighs each column's rounding error by sum / count, the mean squared
activation, so columns that carry large inputs are kept more precisely.

File format: the GGUF imatrix format current llama.cpp writes by default and reads first (the
quantizer still falls back to the legacy .dat stream): keys `general.type = "imatrix"`,
`imatrix.datasets` (strings), `imatrix.chunk_count`, `imatrix.chunk_size` (u32); per weight two F32
tensors, `<name>.in_sum2` (ne = [columns, matrices]) and `<name>.counts` (ne = [1, matrices]).
A dense weight is one matrix. A stacked routed-experts weight (ffn_gate_exps / ffn_up_exps /
ffn_down_exps) has one matrix per expert: the squared inputs of only the tokens the router sent
to that expert, and that token count (llama-imatrix's MUL_MAT_ID collection). llama.cpp's
quantizer takes columns x experts values, expert-major, and quantizes each expert with its own
row; an expert that saw no token gets weight 1 for every column (as llama-quantize does).
Newer llama-imatrix files also hold `<name>.in_sum` (plain sums, for its statistics); the
quantizer does not use it, so it is ignored here.

Computation: calibration text is tokenized and cut into chunks of `chunk_size` tokens starting
with BOS (as llama-imatrix does); the chunks go through the reference model one decoder layer at a
time (transformers' own layer classes, filled from the checkpoint), with a hook on every linear.
Routed experts: transformers 5 holds a layer's experts fused in memory (`gate_up_proj` [experts,
2 x ffn, hidden] = each expert's gate rows then up rows, `down_proj` [experts, hidden, ffn]); the
per-expert checkpoint tensors are stacked into that layout, and a hook on the experts module sees
the router's choice (top-k expert indices per token) with the hidden states, so each expert's
gate/up inputs are exactly its routed tokens, and its down input is act(gate) * up of those.
Memory: one layer in float32 plus the hidden states of all chunks, never the whole model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gguf
import numpy as np

from ..console import info, progress
from ..errors import CorruptFileError, InputError, ShapeError, UnsupportedError

if TYPE_CHECKING:
    from .plan import GGUFPlan

KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"
SUM_SUFFIX = ".in_sum2"
COUNT_SUFFIX = ".counts"


@dataclass
class Imatrix:
    """name (GGUF weight) -> (sums, count).

    A dense weight: the sum of squared inputs per column (float64, shape (columns,)) and the
    number of rows (tokens) summed (int). Stacked routed experts: the sums per expert (shape
    (experts, columns)) and the tokens routed to each expert (int64 array, shape (experts,))."""

    entries: dict[str, tuple[np.ndarray, Any]]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    source: str = ""  # where it came from: a file path, or "calibration:<set>"

    def values(self) -> dict[str, np.ndarray]:
        """What the quantizer takes: mean squared activation per column (float32); for experts,
        each expert's row in turn, 1 where an expert saw no token (llama-quantize's rule)."""
        return {name: _mean_squares(sums, count) for name, (sums, count) in self.entries.items()}

    def expert_entries(self) -> int:
        return sum(1 for sums, _ in self.entries.values() if sums.ndim == 2)

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "datasets": self.datasets, "entries": len(self.entries),
                "chunks": self.chunk_count, "chunk_size": self.chunk_size}

    def check(self, plan: "GGUFPlan") -> None:
        """Every entry names a weight of the plan (2-D, or 3-D stacked experts) with as many
        columns, and for experts as many rows of values, as the weight has. An older file's single
        count for all experts is broadcast to each expert, as llama.cpp does."""
        shapes = {t.name: t.shape for t in plan.tensors if len(t.shape) in (2, 3)}
        for name, (sums, count) in list(self.entries.items()):
            if name not in shapes:
                raise ShapeError(f"{self.source}: importance matrix entry '{name}' is not a weight of {plan.src.name}")
            shape = shapes[name]
            want = (shape[0], shape[-1]) if len(shape) == 3 else (shape[-1],)
            if len(shape) == 3 and sums.shape == (shape[0] * shape[-1],):
                # one count for all experts (older llama-imatrix files): llama.cpp broadcasts it
                sums = sums.reshape(want)
                self.entries[name] = (sums, np.full(shape[0], int(count), dtype=np.int64))
            if sums.shape != want:
                raise ShapeError(f"{self.source}: importance matrix entry '{name}' holds {_describe(sums.shape)}, "
                                 f"the weight needs {_describe(want)}")
        if not self.entries:
            raise InputError(f"{self.source}: the importance matrix is empty")

    def save(self, path: Path) -> None:
        """Write llama.cpp's GGUF imatrix file."""
        writer = gguf.GGUFWriter(path, "imatrix")
        writer.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)  # llama-imatrix writes none
        writer.add_type("imatrix")
        writer.add_array(KEY_DATASETS, self.datasets or ["unknown"])
        writer.add_uint32(KEY_CHUNK_COUNT, self.chunk_count)
        writer.add_uint32(KEY_CHUNK_SIZE, self.chunk_size)
        for name in sorted(self.entries):
            sums, count = self.entries[name]
            # numpy (matrices, columns) is ggml ne [columns, matrices], as llama-imatrix writes
            writer.add_tensor(name + SUM_SUFFIX, np.atleast_2d(sums).astype(np.float32))
            writer.add_tensor(name + COUNT_SUFFIX, np.asarray(count, dtype=np.float32).reshape(-1, 1))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    @classmethod
    def load(cls, path: Path) -> "Imatrix":
        """Read a GGUF imatrix file (written by llama-imatrix or by xquant)."""
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: no such importance matrix file")
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise CorruptFileError(f"{path}: not a GGUF imatrix file (legacy .dat files: convert them "
                                       f"with llama-imatrix --in-file {path.name} -o {path.stem}.gguf)")
        try:
            reader = gguf.GGUFReader(path)
        except (ValueError, OSError) as e:
            raise CorruptFileError(f"{path}: damaged GGUF ({e})") from None
        tensors = {t.name: t for t in reader.tensors}
        entries = {}
        for name, t in tensors.items():
            if not name.endswith(SUM_SUFFIX):
                continue
            base = name[: -len(SUM_SUFFIX)]
            if base + COUNT_SUFFIX not in tensors:
                raise CorruptFileError(f"{path}: '{name}' has no matching '{base}{COUNT_SUFFIX}'")
            entries[base] = _read_entry(path, base, t, tensors[base + COUNT_SUFFIX])

        def scalar(key: str) -> int:
            f = reader.get_field(key)
            return int(f.contents()) if f is not None else 0

        ds = reader.get_field(KEY_DATASETS)
        return cls(entries, list(ds.contents()) if ds is not None else [], scalar(KEY_CHUNK_COUNT),
                   scalar(KEY_CHUNK_SIZE), str(path))


def _mean_squares(sums: np.ndarray, count: Any) -> np.ndarray:
    """sums / count in float32 from float32 sums, as llama-quantize computes it from the file, so a
    matrix handed over in memory and the same matrix read from its saved file quantize alike."""
    sums = np.atleast_2d(sums.astype(np.float32))
    counts = np.asarray(count, dtype=np.float32).reshape(-1, 1)
    return np.where(counts > 0, sums / np.maximum(counts, np.float32(1)), np.float32(1)).reshape(-1)


def _describe(shape: tuple[int, ...]) -> str:
    return f"{shape[0]} values" if len(shape) == 1 else f"{shape[1]} values for each of {shape[0]} experts"


def _read_entry(path: Path, base: str, sums_t, counts_t) -> tuple[np.ndarray, Any]:
    """One entry from its in_sum2 / counts tensors: dense (one matrix) or one row per expert."""
    n = int(counts_t.n_elements)
    sums = np.array(sums_t.data, dtype=np.float64).reshape(-1)
    counts = np.array(counts_t.data, dtype=np.float64).reshape(-1)
    if n < 1 or sums.size == 0 or sums.size % n:
        raise CorruptFileError(f"{path}: '{base}' has {sums.size} sums for {n} counts")
    if not (np.isfinite(counts).all() and (counts >= 0).all() and np.isfinite(sums).all()):
        raise CorruptFileError(f"{path}: '{base}' holds non-finite or negative values")
    if n == 1:
        return sums, int(round(counts[0]))
    return sums.reshape(n, -1), np.rint(counts).astype(np.int64)


def calibration_chunks(tokenizer, set_name: str, chunk_size: int, n_chunks: int) -> list[list[int]]:
    """Consecutive chunks of the calibration text, each starting with BOS (llama-imatrix's way)."""
    from ..calib import load_set

    ids: list[int] = []
    for doc in load_set(set_name, "calib").documents:
        ids.extend(tokenizer(doc, add_special_tokens=False, verbose=False)["input_ids"])
    bos = tokenizer.bos_token_id
    body = chunk_size - (1 if bos is not None else 0)
    if len(ids) < body:
        raise InputError(f"{set_name}: {len(ids)} calibration tokens, fewer than one chunk of {chunk_size}")
    chunks = [ids[i: i + body] for i in range(0, len(ids) - body + 1, body)][:n_chunks]
    return [([bos] if bos is not None else []) + c for c in chunks]


def _causal_mask(n: int):
    import torch

    return torch.full((n, n), float("-inf")).triu(1)[None, None]


# transformers 5 holds routed experts fused in memory: parameter -> the checkpoint roles it
# concatenates per expert (rows of gate, then rows of up), in the `[experts]` section's names.
FUSED_EXPERTS = {"gate_up_proj": ("gate", "up"), "down_proj": ("down",)}


@dataclass
class _Experts:
    """One decoder layer's routed experts: where the fused module is, GGUF name per role."""

    module: str  # path inside the decoder layer, e.g. "mlp.experts"
    count: int
    gguf: dict[str, str]  # role (gate/up/down) -> stacked GGUF weight name
    checkpoint: dict[str, list[str]]  # role -> per-expert checkpoint tensor names


def _layer_experts(plan: "GGUFPlan", i: int, prefix: str) -> _Experts | None:
    """Decoder layer i's routed experts (from the architecture's `[experts]` templates and the
    plan's stacked tensors), or None for a dense layer."""
    arch = plan.arch
    roles = arch.expert_tensors(i, plan.config)
    if not roles:
        return None
    by_stack = {t.stack: t.name for t in plan.tensors if t.stack}
    gguf_names = {role: by_stack[tuple(names)] for role, names in roles.items()}
    template = arch.experts.roles[next(iter(roles))].format(i=i, e="{e}")
    module = template.split(".{e}.", 1)[0].removeprefix(prefix)
    return _Experts(module, len(next(iter(roles.values()))), gguf_names, roles)


def _fuse_experts(state: dict, layer, experts: _Experts, prefix: str, source: Path) -> None:
    """Replace the per-expert checkpoint tensors in a layer's state dict by the fused parameters
    of transformers' experts module (checked against the module's own shapes)."""
    import torch

    module = layer.get_submodule(experts.module)
    params = dict(module.named_parameters(recurse=False))
    layout = (getattr(module, "is_concatenated", True), getattr(module, "is_transposed", False),
              getattr(module, "has_bias", False))
    roles = {r for fused in FUSED_EXPERTS.values() for r in fused}
    if set(params) != set(FUSED_EXPERTS) or layout != (True, False, False) or set(experts.checkpoint) != roles:
        raise UnsupportedError(f"{source}: importance matrix: the experts module {type(module).__name__} "
                               f"({', '.join(sorted(params))}) is not transformers' fused gate_up/down layout")
    for pname, roles in FUSED_EXPERTS.items():
        fused = torch.stack([torch.cat([state.pop(experts.checkpoint[r][e][len(prefix):]) for r in roles])
                             for e in range(experts.count)])
        if tuple(fused.shape) != tuple(params[pname].shape):
            raise ShapeError(f"{source}: experts of {prefix.rstrip('.')} stack to {list(fused.shape)}, "
                             f"transformers' {experts.module}.{pname} is {list(params[pname].shape)}")
        state[f"{experts.module}.{pname}"] = fused


def _per_expert_modules(layer, experts: _Experts, prefix: str) -> dict[str, list[str]] | None:
    """role -> each expert's Linear module path inside the layer, when the layer class holds the
    routed experts as one nn.Linear per expert named as on disk (XVERSE-MoE's, xquant/models);
    None when they are fused (transformers 5's MoE classes)."""
    local = {role: [n[len(prefix):] for n in names] for role, names in experts.checkpoint.items()}
    params = set(layer.state_dict())
    if not all(n in params for names in local.values() for n in names):
        return None
    return {role: [n.removesuffix(".weight") for n in names] for role, names in local.items()}


def compute_imatrix(plan: "GGUFPlan", threads: int | None = None) -> Imatrix:
    """Run the calibration chunks through the reference model one decoder layer at a time and
    collect, for every linear layer, the squared inputs per column (for routed experts, per
    expert over the tokens routed to it).

    Only one layer's weights (float32) and the hidden states of all chunks are in memory: the
    embedding rows are looked up, each layer is built on the meta device from the architecture's
    own transformers classes and filled with its tensors, run over every chunk, then dropped."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..models import hf_config

    if threads:
        torch.set_num_threads(threads)
    arch, reader = plan.arch, plan.reader
    names = {t.source: t.name for t in plan.tensors if len(t.shape) == 2 and "token_embd" not in t.name}
    context = int(plan.config.get("max_position_embeddings") or 512)
    chunk_size = min(512, context)
    tokenizer = AutoTokenizer.from_pretrained(plan.src)
    chunks = calibration_chunks(tokenizer, plan.calibration, chunk_size, plan.imatrix_chunks)
    info(f"importance matrix: {len(chunks)} chunks of {chunk_size} tokens from '{plan.calibration}'")
    config = hf_config(plan.src)  # an architecture xquant implements itself: its registered class
    config._attn_implementation = "eager"  # takes the explicit causal mask below as is
    config._experts_implementation = "eager"  # the plain per-expert loop: no grouped-matmul kernels
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    base = skeleton.get_submodule(arch.layers_module.rsplit(".", 1)[0])
    layer_cls, norm_cls = type(skeleton.get_submodule(arch.layers_module)[0]), type(base.norm)
    rotary = type(base.rotary_emb)(config=config)
    del skeleton, base
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, Any] = {}

    def record(name: str, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
        sums[name] = sums.get(name, 0) + (x * x).sum(dim=0)
        counts[name] = counts.get(name, 0) + x.shape[0]

    def record_experts(experts: _Experts, module, args, kwargs) -> None:
        """The experts module's input: hidden states (tokens x hidden) and the router's top-k
        expert indices per token; each expert's inputs are its routed tokens only."""
        hidden = (args[0] if args else kwargs["hidden_states"]).detach()
        index = args[1] if len(args) > 1 else kwargs["top_k_index"]
        hidden = hidden.reshape(-1, hidden.shape[-1])
        index = index.reshape(hidden.shape[0], -1)
        for role, name in experts.gguf.items():
            cols = hidden.shape[-1] if role != "down" else module.down_proj.shape[-1]
            sums.setdefault(name, torch.zeros(experts.count, cols, dtype=torch.float64))
            counts.setdefault(name, torch.zeros(experts.count, dtype=torch.int64))
        for e in range(experts.count):
            rows = (index == e).any(dim=-1).nonzero().squeeze(-1)
            if rows.numel() == 0:
                continue
            x = hidden[rows]
            gate, up = torch.nn.functional.linear(x, module.gate_up_proj[e]).chunk(2, dim=-1)
            h = module.act_fn(gate) * up  # what the expert's down projection receives
            for role, inp in (("gate", x), ("up", x), ("down", h)):
                name = experts.gguf[role]
                sums[name][e] += (inp.to(torch.float64) ** 2).sum(dim=0)
                counts[name][e] += rows.numel()

    def record_expert(name: str, e: int, x: torch.Tensor) -> None:
        """One routed expert's Linear input: only the tokens the router sent that expert."""
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
        sums[name][e] += (x * x).sum(dim=0)
        counts[name][e] += x.shape[0]

    def tensors_with_prefix(prefix: str) -> dict[str, torch.Tensor]:
        return {n[len(prefix):]: reader.get(n).to(torch.float32) for n in reader.names()
                if n.startswith(prefix) and not n.endswith(("rotary_emb.inv_freq",))}

    embed = reader.get(arch.globals["embed"]).to(torch.float32)
    hidden = [embed[torch.tensor(c)][None] for c in chunks]
    del embed
    positions = torch.arange(chunk_size)[None]
    cos, sin = rotary(hidden[0], positions)
    n_layers = arch.num_layers(plan.config)
    with torch.inference_mode(), progress("importance matrix (layers)", total=n_layers + 1) as advance:
        for i in range(n_layers):
            prefix = f"{arch.layers_module}.{i}."
            with torch.device("meta"):
                layer = layer_cls(config, layer_idx=i)
            state = tensors_with_prefix(prefix)
            experts = _layer_experts(plan, i, prefix)
            per_expert = _per_expert_modules(layer, experts, prefix) if experts is not None else None
            if experts is not None and per_expert is None:
                _fuse_experts(state, layer, experts, prefix, plan.src)
            layer.load_state_dict(state, strict=True, assign=True)
            del state
            hooks = [m.register_forward_pre_hook(lambda mod, args, n=names[prefix + local + ".weight"]: record(n, args[0]))
                     for local, m in layer.named_modules() if prefix + local + ".weight" in names]
            if per_expert is not None:  # one Linear per expert: hooked directly, like llama-imatrix's MUL_MAT_ID
                for role, modules in per_expert.items():
                    name = experts.gguf[role]
                    cols = layer.get_submodule(modules[0]).in_features
                    sums.setdefault(name, torch.zeros(experts.count, cols, dtype=torch.float64))
                    counts.setdefault(name, torch.zeros(experts.count, dtype=torch.int64))
                    hooks += [layer.get_submodule(m).register_forward_pre_hook(
                        lambda mod, args, n=name, e=e: record_expert(n, e, args[0])) for e, m in enumerate(modules)]
            elif experts is not None:
                hooks.append(layer.get_submodule(experts.module).register_forward_pre_hook(
                    lambda mod, args, kwargs, x=experts: record_experts(x, mod, args, kwargs), with_kwargs=True))
            for j, h in enumerate(hidden):
                n = h.shape[1]
                hidden[j] = layer(h, attention_mask=_causal_mask(n), position_ids=positions[:, :n],
                                  position_embeddings=(cos[:, :n], sin[:, :n]))
            for hook in hooks:
                hook.remove()
            del layer
            reader.release()
            advance()
        if arch.globals.get("lm_head") in names:  # the output matrix sees the final norm's output
            norm = norm_cls(config.hidden_size, eps=config.rms_norm_eps)
            norm.load_state_dict({"weight": reader.get(arch.globals["norm"]).to(torch.float32)})
            for h in hidden:
                record(names[arch.globals["lm_head"]], norm(h))
        advance()
    wanted = set(names.values()) | {t.name for t in plan.tensors if t.stack}
    missing = sorted(wanted - set(sums))
    if missing:
        raise ShapeError(f"{plan.src}: no activations reached {missing[0]} (and {len(missing) - 1} more)")
    entries = {n: (sums[n].numpy(), counts[n] if isinstance(counts[n], int) else counts[n].numpy()) for n in sums}
    bad = [n for n, (s, _) in entries.items() if not np.isfinite(s).all()]
    if bad:
        raise ShapeError(f"{plan.src}: non-finite activations entering {bad[0]} during calibration")
    idle = {n: int((c == 0).sum()) for n, (_, c) in entries.items() if np.ndim(c) and (c == 0).any()}
    if idle:
        info(f"importance matrix: {sum(idle.values())} expert matrices in {len(idle)} stacked weights received no "
             f"calibration token (llama.cpp weighs their columns equally); more --imatrix-chunks reach more experts")
    return Imatrix(entries, [plan.calibration], len(chunks), chunk_size, f"calibration:{plan.calibration}")
