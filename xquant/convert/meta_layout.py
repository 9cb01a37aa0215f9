"""Meta's model-parallel checkpoint layout: which tensor is which, how shards combine, rotary order.

The names and the combining rule of each role (concatenation axis, or replicated in every shard)
are data, in the `[meta]` and `[meta_convert]` sections of converters/<arch>.toml (which roles are
rotary-permuted, which tensors carry nothing). The shape of each role in terms of params.json sizes
and the permutation itself are the only code. `check_shards` validates a
whole checkpoint from tensor headers alone (no data read) and fails on the first inconsistency with
a message naming the shard file and tensor.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..arch import Architecture
from ..errors import ShapeError, UnsupportedError
from ..io.dtypes import FLOAT_DTYPES, dtype_name
from ..io.readers import TensorReader
from .meta_params import MetaParams

# Role -> full (unsharded) shape, in params.json symbols (see MetaParams.sizes).
ROLE_SHAPES: dict[str, tuple[str, ...]] = {
    "embed": ("vocab", "dim"), "norm": ("dim",), "lm_head": ("vocab", "dim"),
    "attn_norm": ("dim",), "q": ("dim", "dim"), "k": ("kv_dim", "dim"), "v": ("kv_dim", "dim"),
    "o": ("dim", "dim"), "ffn_norm": ("dim",), "gate": ("ffn", "dim"), "up": ("ffn", "dim"),
    "down": ("dim", "ffn"),
}
# Output order of the global roles: embedding before the layers, the rest after.
_FIRST_GLOBALS = ("embed",)


@dataclass(frozen=True)
class MetaTensor:
    """One output tensor: where it comes from in every shard and how the shards combine."""

    role: str
    layer: int | None
    meta_name: str
    hf_name: str
    dim: int | None  # concatenation axis across shards; None = replicated
    symbols: tuple[str, ...]
    rotary_heads: int | None

    def full_shape(self, sizes: dict[str, int]) -> tuple[int, ...]:
        return tuple(sizes[s] for s in self.symbols)

    def describe(self, shards: int) -> str:
        if shards == 1:
            how = "1 shard"
        else:
            how = f"replicated x{shards}" if self.dim is None else f"cat dim {self.dim} x{shards}"
        return how + (f", rotary {self.rotary_heads} heads" if self.rotary_heads else "")


def _entry(arch: Architecture, role: str, p: MetaParams, layer: int | None) -> MetaTensor:
    spec = arch.meta[role]
    if role not in ROLE_SHAPES:
        raise UnsupportedError(f"converters/{arch.name}.toml: Meta role '{role}' has no known shape")
    hf = arch.globals[role] if layer is None else arch.layer_tensor(role, layer)
    permute = arch.meta_convert.rope_permute
    heads = getattr(p, permute[role]) if role in permute else None
    if heads and (spec.dim or 0) != 0:
        raise UnsupportedError(f"converters/{arch.name}.toml: rotary role '{role}' must be split on dim 0")
    return MetaTensor(role, layer, spec.name.format(i=layer), hf,
                      None if spec.replicated else spec.dim, ROLE_SHAPES[role], heads)


def meta_tensors(arch: Architecture, p: MetaParams) -> list[MetaTensor]:
    """Every tensor of the checkpoint, in Hugging Face output order."""
    if not arch.meta:
        raise UnsupportedError(f"converters/{arch.name}.toml: no [meta] section (no Meta layout known)")
    global_roles = [r for r in arch.meta if r in arch.globals]
    layer_roles = [r for r in arch.layer if r in arch.meta]
    first = [_entry(arch, r, p, None) for r in global_roles if r in _FIRST_GLOBALS]
    last = [_entry(arch, r, p, None) for r in global_roles if r not in _FIRST_GLOBALS]
    layers = [_entry(arch, r, p, i) for i in range(p.n_layers) for r in layer_roles]
    return first + layers + last


def ignored_names(arch: Architecture) -> set[str]:
    """Meta tensors with nothing to convert (LLaMA-1's precomputed rotary frequencies)."""
    return set(arch.meta_convert.ignored)


# ---------------------------------------------------------------- rotary order

def to_hf_rotary(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Meta -> HF row order of a q/k projection.

    Meta rotates rows (2j, 2j+1) of each head together (complex pairs); transformers' rotate_half
    pairs row j with row j + head_dim/2. Same numbers, rows reordered within each head.
    """
    rows, cols = w.shape
    half = rows // heads // 2
    return w.reshape(heads, half, 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_rotary_into(out: torch.Tensor, w: torch.Tensor, heads: int) -> None:
    """out[:] = to_hf_rotary(w, heads), as one strided copy (to_hf_rotary's reshape of the
    transposed view would first make a reordered copy of w). out: rows of a contiguous output."""
    rows, cols = w.shape
    half = rows // heads // 2
    out.view(heads, 2, half, cols).copy_(w.reshape(heads, half, 2, cols).transpose(1, 2))


def to_meta_rotary(w: torch.Tensor, heads: int) -> torch.Tensor:
    """HF -> Meta row order; the exact inverse of `to_hf_rotary`."""
    rows, cols = w.shape
    half = rows // heads // 2
    return w.reshape(heads, 2, half, cols).transpose(1, 2).reshape(rows, cols)


# ---------------------------------------------------------------- validation

def _natural(name: str):
    return [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", name)]


def _fmt(shape) -> str:
    return "x".join(map(str, shape)) if shape else "scalar"


def check_shards(reader: TensorReader, files: list[Path], arch: Architecture, p: MetaParams,
                 tensors: list[MetaTensor]) -> int:
    """Validate names, shard count, shapes and dtypes of every shard; returns the vocabulary size."""
    n = len(files)
    names = [set(reader.shard_names(i)) for i in range(n)]
    first = files[0]
    for i in range(1, n):
        lacking = sorted(names[0] - names[i], key=_natural)
        if lacking:
            more = f" ({len(lacking)} tensors in all)" if len(lacking) > 1 else ""
            raise ShapeError(f"{files[i]}: lacks tensor '{lacking[0]}' that {first.name} holds{more}")
        extra = sorted(names[i] - names[0], key=_natural)
        if extra:
            raise ShapeError(f"{files[i]}: holds tensor '{extra[0]}' that {first.name} lacks")
    expected = {t.meta_name for t in tensors}
    for name in sorted(names[0] - expected - ignored_names(arch), key=_natural):
        m = re.match(r"layers\.(\d+)\.", name)
        if m and int(m.group(1)) >= p.n_layers:
            raise ShapeError(f"{first}: holds '{name}' but {p.path.name} says n_layers {p.n_layers}")
        raise ShapeError(f"{first}: unknown tensor '{name}' (not in the {arch.name} layout of "
                         f"converters/{arch.name}.toml)")
    for t in tensors:
        if t.meta_name not in names[0]:
            raise ShapeError(f"{first}: lacks tensor '{t.meta_name}' ({p.path.name}: n_layers {p.n_layers})")
    for key in ("n_heads", "n_kv_heads"):
        value = getattr(p, key)
        if value % n:
            raise ShapeError(f"{p.path}: {n} model-parallel shards ({first.name} .. {files[-1].name}) do not "
                             f"divide {key} {value}; every shard must hold whole heads")
    _check_shard_count(reader, files, p, tensors)
    vocab = _vocab(reader, files, p, tensors)
    sizes = p.sizes(vocab)
    for t in tensors:
        _check_tensor(reader, files, p, t, sizes)
    return vocab


def _check_shard_count(reader: TensorReader, files: list[Path], p: MetaParams, tensors: list[MetaTensor]) -> None:
    """A missing trailing shard leaves a smaller, self-consistent set: the split sizes give it away."""
    n = len(files)
    q = next((t for t in tensors if t.role == "q" and t.dim is not None), None)
    if q is None:
        return
    shape = reader.info(f"0/{q.meta_name}").shape
    rows = shape[q.dim] if len(shape) > q.dim else 0  # a malformed shape is reported by _check_tensor
    if rows and p.dim % rows == 0 and p.dim // rows != n:
        total = p.dim // rows
        what = f"{q.meta_name} holds {rows} of dim {p.dim} along axis {q.dim}, i.e. 1 of {total} model-parallel shards"
        if total > n:
            raise ShapeError(f"{files[0]}: {what}, but only {n} found: consolidated.{n:02d}.pth is missing")
        raise ShapeError(f"{files[0]}: {what}, but {n} shard files were found")


def _vocab(reader: TensorReader, files: list[Path], p: MetaParams, tensors: list[MetaTensor]) -> int:
    """vocab_size from params.json, or (when it says -1, as Meta's releases do) from the embedding."""
    if p.vocab_size > 0:
        return p.vocab_size
    embed = next((t for t in tensors if t.symbols and t.symbols[0] == "vocab"), None)
    if embed is None:
        raise ShapeError(f"{p.path}: vocab_size is -1 and no tensor gives the vocabulary size")
    shape = reader.info(f"0/{embed.meta_name}").shape
    if len(shape) != len(embed.symbols) or not shape[0]:
        raise ShapeError(f"{files[0]}: {embed.meta_name} is {_fmt(shape)}, expected vocabulary x dim")
    return shape[0] * len(files) if embed.dim == 0 else shape[0]


def _check_tensor(reader: TensorReader, files: list[Path], p: MetaParams, t: MetaTensor,
                  sizes: dict[str, int]) -> None:
    n = len(files)
    full = t.full_shape(sizes)
    want = list(full)
    if t.dim is not None:
        if full[t.dim] % n:
            raise ShapeError(f"{files[0]}: {t.meta_name} has {full[t.dim]} along axis {t.dim}, which does not "
                             f"split into {n} model-parallel shards")
        want[t.dim] //= n
    why = "; ".join(dict.fromkeys(p.explain(s, sizes) for s in t.symbols))
    dtype0 = reader.info(f"0/{t.meta_name}").dtype
    for i in range(n):
        info = reader.info(f"{i}/{t.meta_name}")
        if tuple(info.shape) != tuple(want):
            per = " per shard" if n > 1 else ""
            raise ShapeError(f"{info.file}: {t.meta_name} is {_fmt(info.shape)}, {p.path.name} implies "
                             f"{_fmt(want)}{per} ({why})")
        if info.dtype not in FLOAT_DTYPES:
            raise ShapeError(f"{info.file}: {t.meta_name} has dtype {dtype_name(info.dtype)}, expected floating point")
        if info.dtype != dtype0:
            raise ShapeError(f"{info.file}: {t.meta_name} is {dtype_name(info.dtype)} but "
                             f"{files[0].name} has {dtype_name(dtype0)}")
