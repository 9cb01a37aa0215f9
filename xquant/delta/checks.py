"""Everything apply-delta and make-delta verify before writing: that the base is the right one.

Three levels, from cheap to content:
1. Shapes (config + tensor headers): same architecture, hidden/ffn sizes, layer and head counts;
   every tensor on one side has its counterpart on the other with the same shape, except the
   vocabulary rows of the embedding and head, which the delta may extend.
2. Base identity (config): fields a fine-tune keeps from its base (`[base_identity]` in
   converters/<arch>.toml). LLaMA-1 and Llama-2 7B/13B have identical shapes but differ in
   rms_norm_eps and max_position_embeddings, so this catches that confusion without reading a weight.
3. Content: a delta made by xquant carries a fingerprint of its base (32 sampled values per
   tensor, `xquant-delta.json`), checked on the first decoder layer before writing and on every
   tensor as it streams. For deltas made elsewhere, the embedding is compared with the base's:
   a Ziya-style delta stores it whole, so it must resemble the base's rows (mean row cosine);
   a FastChat-style delta stores a difference, so it must not look like the base itself.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass
from typing import Any

import torch

from ..arch import Architecture
from ..errors import InputError, ShapeError, UnsupportedError
from ..io.dtypes import FLOAT_DTYPES, dtype_name, parse_dtype
from ..io.readers import TensorInfo, TensorReader
from ..model import HFModel
from ..io.pages import trim_heap
from .arith import consumed, owns_mapping
from .styles import VOCAB_ROLES, Style

SHAPE_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim")
SAMPLE = 32  # values per tensor in a base fingerprint
# Mean row cosine between a whole-stored (Ziya-style) embedding and the base's: the right base
# gives values near 1 after fine-tuning, an unrelated model ~0 (independent trainings).
WHOLE_MIN_COSINE = 0.1
# A FastChat-style delta holds differences; an embedding this similar to the base's is a whole copy.
DIFF_MAX_COSINE = 0.8


# ---------------------------------------------------------------- config

def _config_value(config: dict[str, Any], field: str, default: Any = None) -> Any:
    if config.get(field) is not None:
        return config[field]
    nested = config.get("rope_parameters") or {}  # transformers >= 5 keeps rope_theta here
    if isinstance(nested, dict) and nested.get(field) is not None:
        return nested[field]
    if field == "num_key_value_heads":
        return config.get("num_attention_heads")
    if field == "head_dim" and config.get("hidden_size") and config.get("num_attention_heads"):
        return config["hidden_size"] // config["num_attention_heads"]
    return default


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
    return a == b


def check_shapes(base: HFModel, other: HFModel, label: str) -> Architecture:
    """Same architecture and sizes; the other side's vocabulary may only be larger."""
    arch, other_arch = base.arch, other.arch
    if arch.name != other_arch.name:
        raise ShapeError(f"{other.path}: the {label} is a {other_arch.name} model, the base {base.path} "
                         f"a {arch.name} model")
    for field in SHAPE_FIELDS:
        a, b = _config_value(base.config, field), _config_value(other.config, field)
        if a is not None and b is not None and a != b:
            what = f"{a} decoder layers, the {label} {b}" if field == "num_hidden_layers" else \
                f"{field} {a}, the {label} {b}"
            raise ShapeError(f"{base.path}/config.json: the base has {what}: not the base of this {label}")
    vb, vo = base.config.get("vocab_size"), other.config.get("vocab_size")
    if vb is not None and vo is not None and vo < vb:
        raise ShapeError(f"{other.path}/config.json: the {label}'s vocabulary ({vo}) is smaller than "
                         f"the base's ({vb})")
    return arch


def base_identity_mismatches(arch: Architecture, base_cfg: dict, other_cfg: dict) -> list[str]:
    """'field a vs b' for every identity field on which the two configs disagree."""
    out = []
    for field, default in arch.base_identity.items():
        a, b = _config_value(base_cfg, field, default), _config_value(other_cfg, field, default)
        if not _same(a, b):
            out.append(f"{field} {a} vs {b}")
    return out


def check_base_identity(arch: Architecture, base: HFModel, other: HFModel, label: str) -> None:
    diffs = base_identity_mismatches(arch, base.config, other.config)
    if diffs:
        raise InputError(
            f"{base.path}: not the base of this {label}: config.json differs in {', '.join(diffs)} "
            f"(base vs {label}; LLaMA-1 and Llama-2 differ exactly there); --skip-base-check overrides")


def declared_dtype(model: HFModel) -> torch.dtype:
    """The dtype a checkpoint declares in config.json, else that of its first float tensor."""
    name = model.config.get("dtype") or model.config.get("torch_dtype")
    if isinstance(name, str):
        try:
            return parse_dtype(name)
        except UnsupportedError:
            pass
    for info in model.tensors.infos():
        if info.dtype in FLOAT_DTYPES:
            return info.dtype
    raise UnsupportedError(f"{model.path}: holds no floating-point tensors")


# ---------------------------------------------------------------- tensors

@dataclass(frozen=True)
class Pair:
    """One output tensor: the other side's tensor and the base's counterpart."""

    name: str
    other: TensorInfo
    base: TensorInfo
    vocab: bool  # rows are the vocabulary (the other side may have more)
    whole: bool  # the delta stores this tensor whole: the base is not involved
    group: int | None

    @property
    def extra_rows(self) -> int:
        return self.other.shape[0] - self.base.shape[0] if self.vocab else 0


def derived_names(arch: Architecture, layers: int) -> set[str]:
    templates = arch.derived.values()
    return {t.format(i=i) for t in templates for i in range(layers)}


def pair_tensors(arch: Architecture, style: Style, base: HFModel, other: HFModel, label: str) -> list[Pair]:
    """Match every tensor of `other` (delta or target) with the base's, in output order."""
    layers = max(arch.num_layers(base.config), arch.num_layers(other.config))
    skip = derived_names(arch, layers)
    role_of = {name: role for role, name in arch.globals.items()}
    b_names = [n for n in base.tensors.names() if n not in skip]
    o_names = [n for n in other.tensors.names() if n not in skip]
    o_set = set(o_names)
    for n in b_names:
        if n not in o_set:
            raise ShapeError(f"{other.path}: the {label} has no tensor '{n}', which the base has "
                             f"({len(o_names)} tensors against the base's {len(b_names)})")
    pairs = []
    for n in o_names:
        if n not in base.tensors:
            raise ShapeError(f"{other.path}: tensor '{n}' of the {label} has no counterpart in the base {base.path}")
        o, b = other.tensors.info(n), base.tensors.info(n)
        for info, side in ((o, label), (b, "base")):
            if info.dtype not in FLOAT_DTYPES:
                raise UnsupportedError(f"{info.file}: tensor '{n}' of the {side} is {dtype_name(info.dtype)}, "
                                       f"not floating point (quantized checkpoints cannot take deltas)")
        role = role_of.get(n)
        vocab = role in VOCAB_ROLES
        if o.shape != b.shape:
            grows = vocab and len(o.shape) == len(b.shape) and o.shape[1:] == b.shape[1:] and o.shape[0] > b.shape[0]
            if not grows:
                raise ShapeError(f"{o.file}: tensor '{n}' is {'x'.join(map(str, o.shape))} in the {label} but "
                                 f"{'x'.join(map(str, b.shape))} in the base")
        pairs.append(Pair(n, o, b, vocab, style.is_whole(role), arch.layer_of(n)))
    first, last = -1, layers  # embedding first, then layer by layer, then norm and head
    order = {n: i for i, n in enumerate(o_names)}

    def key(p: Pair) -> tuple[int, int]:
        if p.group is not None:
            return p.group, order[p.name]
        return (first if role_of.get(p.name) == "embed" else last), order[p.name]

    return sorted(pairs, key=key)


# ---------------------------------------------------------------- content

def sample_values(t: torch.Tensor) -> torch.Tensor:
    """SAMPLE values at evenly spaced flat positions (first and last included), as float32."""
    flat = t.reshape(-1)
    n = flat.numel()
    if n <= SAMPLE:
        idx = torch.arange(n)
    else:
        idx = torch.arange(SAMPLE, dtype=torch.float64).mul((n - 1) / (SAMPLE - 1)).round().long()
    return flat[idx].float()


def fingerprint(t: torch.Tensor) -> dict[str, Any]:
    return {"shape": list(t.shape), "dtype": dtype_name(t.dtype),
            "sample": base64.b64encode(sample_values(t).numpy().tobytes()).decode()}


def _decode(record: dict[str, Any]) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.frombuffer(base64.b64decode(record["sample"]), dtype=np.float32).copy())


def _tolerance(*dtypes: torch.dtype) -> float:
    """Relative rounding of the coarser of two dtypes: the same weights kept at another precision match."""
    return max(torch.finfo(d).eps if d != torch.float32 else 1e-6 for d in dtypes)


def matches_fingerprint(t: torch.Tensor, record: dict[str, Any]) -> bool:
    if list(t.shape) != list(record.get("shape", [])):
        return False
    want = _decode(record)
    got = sample_values(t)
    if got.shape != want.shape:
        return False
    rtol = _tolerance(t.dtype, parse_dtype(record.get("dtype", "float32")))
    return bool(((got - want).abs() <= rtol * want.abs() + 1e-30).all())


def check_fingerprint(name: str, t: torch.Tensor, records: dict[str, Any], base_path, delta_path) -> None:
    record = records.get(name)
    if record is not None and not matches_fingerprint(t, record):
        raise InputError(f"{base_path}: tensor '{name}' is not the one the delta {delta_path} was made from "
                         f"(xquant-delta.json fingerprint differs): wrong base")


COSINE_SAMPLE_ROWS = 4096


COSINE_BLOCK_ROWS = 256  # sampled rows compared at a time: float32 copies of 8 MiB at 8192 columns


def mean_row_cosine(a: torch.Tensor, b: torch.Tensor, release_inputs: bool = False) -> float:
    """Mean cosine similarity of corresponding rows of a[:len(b)] and b, over up to
    COSINE_SAMPLE_ROWS rows spread evenly across the table.

    The checks compare this with thresholds far apart (a whole copy resembles the base, a
    difference does not), so a sample decides as well as every row does, for a fraction of the
    reading: on a 39,410-row embedding it reads a tenth of the rows. The rows go a block at a time
    (COSINE_BLOCK_ROWS; each row's cosine is the same whatever the block): float32 copies of all
    4096 sampled rows were 0.8 GiB of temporaries at 70B widths. With `release_inputs` (both are
    private file mappings of their own, arith._Consumed), the pages read go back block by block
    too. The blocks' temporaries, freed and taken again, left up to 0.14 GiB of glibc's heap
    resident in some runs (fragmentation): the heap is trimmed afterwards.
    """
    rows = b.shape[0]
    idx = torch.linspace(0, rows - 1, min(rows, COSINE_SAMPLE_ROWS)).round().long().unique()
    x_all, y_all = a.reshape(a.shape[0], -1), b.reshape(rows, -1)
    done = [(c, t.shape[1] * t.element_size()) for c, t in
            ((consumed(a, release_inputs), x_all), (consumed(b, release_inputs), y_all)) if c is not None]
    cosines: list[torch.Tensor] = []
    for i0 in range(0, len(idx), COSINE_BLOCK_ROWS):
        block = idx[i0:i0 + COSINE_BLOCK_ROWS]
        x, y = x_all[block].float(), y_all[block].float()
        keep = (x.norm(dim=1) > 0) & (y.norm(dim=1) > 0)
        if bool(keep.any()):
            cosines.append(torch.nn.functional.cosine_similarity(x[keep], y[keep], dim=1))
        for c, row in done:
            c.upto((int(block[-1]) + 1) * row)
    for c, _ in done:
        c.upto(c.end - c.start, final=True)
    mean = float(torch.cat(cosines).mean()) if cosines else 0.0
    cosines.clear()
    trim_heap()
    return mean


def check_embedding(style: Style, pair: Pair, delta: TensorReader, base: TensorReader, base_path, delta_path) -> float:
    """Compare the delta's embedding with the base's, as the style says it should look."""
    cos = mean_row_cosine(delta.get(pair.name), base.get(pair.name),
                          release_inputs=owns_mapping(delta) and owns_mapping(base))
    if pair.whole and cos < WHOLE_MIN_COSINE:
        raise InputError(
            f"{base_path}: tensor '{pair.name}' does not resemble the delta's whole copy (mean row cosine "
            f"{cos:.3f} < {WHOLE_MIN_COSINE}): wrong base, or the delta stores differences (--style fastchat)")
    if not pair.whole and cos > DIFF_MAX_COSINE:
        raise InputError(
            f"{delta_path}: tensor '{pair.name}' is not a difference: it resembles the base's own rows "
            f"(mean row cosine {cos:.3f}); a Ziya-style delta stores it whole: use --style ziya")
    return cos
