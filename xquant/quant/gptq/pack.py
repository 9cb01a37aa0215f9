"""The GPTQ v1 checkpoint layout ("checkpoint_format": "gptq"), and an independent dequantizer.

Per quantized linear `P` (weight [out, in]) a checkpoint holds:
- `P.qweight` int32 [in·bits/32, out]: the codes packed along the input features. Every output
  column is one little-endian bit stream: code i occupies bits i·bits … i·bits+bits-1 of the
  column's words taken in order (word r = bits 32r … 32r+31). For 2/4/8 bits that is 32/bits
  codes per word; for 3 bits, 32 codes fill 3 words and codes 10 and 21 straddle a word edge.
- `P.qzeros` int32 [groups, out·bits/32]: zero points packed the same way along the outputs,
  stored in the v1 convention "zero minus one". GPTQModel writes 2/4/8-bit zeros by subtracting
  the packed constant 0x…1111 from the whole word (a field at 0 would borrow from its neighbour)
  and 3-bit zeros field by field; loaders add back the same way. core.find_params keeps zero
  points ≥ 1, so no field borrows and both readings agree for every kernel.
- `P.scales` float16 [groups, out]; `P.g_idx` int32 [in] (group of each input feature).
The weight is scales[g_idx[i], o] · (code[i, o] − zero[g_idx[i], o]).

The packer shifts codes into words; the dequantizer reads the words back as raw little-endian
bits (numpy unpackbits), so the two share no code path and the tests can check one by the other.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ...errors import ShapeError
from .core import QuantizedWeight

WORD_BITS = 32
SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")


def codes_per_block(bits: int) -> int:
    """Codes in the smallest run that fills whole words: 16 (2-bit), 32 (3-bit), 8 (4-bit), 4 (8-bit)."""
    return WORD_BITS // math.gcd(WORD_BITS, bits)


def packed_shapes(out_features: int, in_features: int, bits: int, group_size: int
                  ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """suffix -> (shape, dtype) of the tensors stored for one linear."""
    groups = 1 if group_size == -1 else in_features // group_size
    return {
        "qweight": ((in_features * bits // WORD_BITS, out_features), torch.int32),
        "qzeros": ((groups, out_features * bits // WORD_BITS), torch.int32),
        "scales": ((groups, out_features), torch.float16),
        "g_idx": ((in_features,), torch.int32),
    }


def check_packable(name: str, out_features: int, in_features: int, bits: int, group_size: int) -> None:
    """Raise ShapeError (naming the tensor) when this linear cannot be stored at these settings."""
    block = codes_per_block(bits)
    if in_features % block or out_features % block:
        raise ShapeError(f"{name}: {bits}-bit GPTQ packs {block} values per word run; "
                         f"in-features {in_features} and out-features {out_features} must both be multiples of {block}")
    if group_size != -1 and (group_size <= 0 or in_features % group_size):
        raise ShapeError(f"{name}: group size {group_size} does not divide its {in_features} in-features "
                         f"(use a divisor or -1 for one group per row)")


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2³²) -> the int32 with the same bits."""
    words = words & 0xFFFFFFFF
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def pack_along(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack integer codes (each < 2**bits) along `dim` into int32 words (the layout above)."""
    v = values.to(torch.int64).movedim(dim, -1)
    n = v.shape[-1]
    per = codes_per_block(bits)
    if n % per:
        raise ShapeError(f"cannot pack {n} values of {bits} bits into whole words (need a multiple of {per})")
    v = v.reshape(*v.shape[:-1], n // per, per)
    words_per = per * bits // WORD_BITS
    words = torch.zeros((*v.shape[:-1], words_per), dtype=torch.int64)
    for j in range(per):
        offset = j * bits
        w, shift = divmod(offset, WORD_BITS)
        words[..., w] |= v[..., j] << shift
        spill = shift + bits - WORD_BITS
        if spill > 0:  # 3-bit codes 10 and 21 cross into the next word
            words[..., w + 1] |= v[..., j] >> (bits - spill)
    words = words.reshape(*words.shape[:-2], -1)
    return _to_int32(words).movedim(-1, dim).contiguous()


def _ones_word(bits: int) -> int:
    return sum(1 << (bits * j) for j in range(WORD_BITS // bits))


def pack_zeros_v1(zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """Zero points [groups, out] -> v1 qzeros (zero minus one, as GPTQModel writes it)."""
    if bits == 3:
        return pack_along((zeros.to(torch.int64) - 1) & 0x7, bits, dim=1)
    packed = pack_along(zeros, bits, dim=1).to(torch.int64) & 0xFFFFFFFF
    return _to_int32(packed - _ones_word(bits))


def pack_linear(qw: QuantizedWeight, bits: int) -> dict[str, torch.Tensor]:
    """suffix -> tensor for one quantized linear, in the v1 layout."""
    return {
        "qweight": pack_along(qw.codes.t(), bits, dim=0),
        "qzeros": pack_zeros_v1(qw.zeros, bits),
        "scales": qw.scales.to(torch.float16).contiguous(),
        "g_idx": qw.g_idx.to(torch.int32).contiguous(),
    }


# ---------------------------------------------------------------- independent reader

def _bit_fields(words: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [rows, W] -> int64 [rows, W·32/bits]: each row's words read as one little-endian bit stream."""
    raw = np.ascontiguousarray(words.numpy().astype("<i4")).view(np.uint8)  # [rows, 4W] bytes
    stream = np.unpackbits(raw, axis=1, bitorder="little")  # [rows, 32W] bits, bit 0 first
    fields = stream.reshape(stream.shape[0], -1, bits).astype(np.int64)
    weights = (1 << np.arange(bits, dtype=np.int64))
    return torch.from_numpy(fields @ weights)


def unpack_qweight(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """qweight [in·bits/32, out] -> codes [in, out]."""
    return _bit_fields(qweight.t().contiguous(), bits).t()


def unpack_qzeros_v1(qzeros: torch.Tensor, bits: int) -> torch.Tensor:
    """v1 qzeros [groups, out·bits/32] -> true zero points [groups, out]."""
    if bits == 3:
        return (_bit_fields(qzeros, bits) + 1) % 8
    fixed = _to_int32((qzeros.to(torch.int64) & 0xFFFFFFFF) + _ones_word(bits))
    return _bit_fields(fixed, bits)


def dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
               bits: int) -> torch.Tensor:
    """The float32 weight [out, in] that a v1 checkpoint's tensors stand for."""
    codes = unpack_qweight(qweight, bits).to(torch.float32)  # [in, out]
    zeros = unpack_qzeros_v1(qzeros, bits).to(torch.float32)  # [groups, out]
    g = g_idx.to(torch.long)
    if codes.shape[0] != g.shape[0] or zeros.shape[1] != codes.shape[1]:
        raise ShapeError(f"GPTQ tensors disagree: qweight unpacks to {list(codes.shape)}, "
                         f"g_idx has {g.shape[0]} entries, qzeros unpacks to {list(zeros.shape)}")
    w = scales.to(torch.float32)[g] * (codes - zeros[g])
    return w.t().contiguous()
