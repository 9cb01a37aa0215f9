"""Pure quantizer cores for the bitsandbytes formats: tensors in, tensors out.

The arithmetic reproduces, bit for bit, what bitsandbytes 0.50 does on CPU when transformers
quantizes a model while loading it (`load_in_8bit` / `load_in_4bit`):

- LLM.int8 (`Int8Params`): the weight is cast to float16, each row is scaled by 127 / absmax(row)
  in float32 and rounded half-to-even; the row absmax ("SCB") is kept in float32.
- NF4 (`quantize_4bit`): blocks of 64 consecutive elements (row-major), scaled by the reciprocal of
  their absmax, mapped to the nearest of the 16 NormalFloat levels (a value exactly between two
  levels takes the lower one), two codes per byte with the even element in the high nibble.
- Double quantization of the NF4 absmax: the mean is subtracted, then blocks of 256 are quantized to
  the signed 8-bit "dynamic" code by bitsandbytes' native CPU kernel, which looks codes up in a
  65,536-entry table instead of searching the code book (reproduced here, including its fused
  multiply-add).

Every function works in bounded memory: large tensors are processed in chunks of whole rows or
whole blocks, which gives the same bits because rows and blocks are independent.
"""

from __future__ import annotations

import torch

# Elements processed at once; float32 temporaries stay around 4 x 64 MiB.
CHUNK = 1 << 24

# The 16 NormalFloat4 levels (quantiles of N(0, 1) rescaled to [-1, 1]), from the QLoRA paper,
# in the float32 values bitsandbytes stores as `weight.quant_map`.
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
NF4_BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256
_LUT_SIZE = 65536


# ---------------------------------------------------------------- LLM.int8

def int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LLM.int8 weight quantization: (int8 weight [out, in], float32 SCB [out]).

    The weight goes through float16 first because that is what bitsandbytes quantizes (a float32
    or bfloat16 checkpoint is rounded to float16 before its row maxima are taken).
    """
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    q = torch.empty((rows, cols), dtype=torch.int8)
    scb = torch.empty((rows,), dtype=torch.float32)
    step = max(1, CHUNK // max(1, cols))
    for r0 in range(0, rows, step):
        half = weight[r0: r0 + step].to(torch.float16)
        absmax = half.abs().amax(dim=1).float()
        # float16 * float32 promotes to float32: the product is rounded once, as in bitsandbytes.
        # An all-zero row gives 0 * inf = NaN, which converts to 0 like the reference.
        scaled = half * (127.0 / absmax.unsqueeze(1))
        q[r0: r0 + step] = torch.round(scaled, out=scaled)  # the float -> int8 cast of .to(int8)
        scb[r0: r0 + step] = absmax
    return q, scb


def int8_dequantize(q: torch.Tensor, scb: torch.Tensor) -> torch.Tensor:
    """float32 weight from an LLM.int8 pair (for checks and error measurements)."""
    return q.float() * (scb.float().unsqueeze(1) / 127.0)


# ---------------------------------------------------------------- NF4

def nf4_levels() -> torch.Tensor:
    return torch.tensor(NF4_LEVELS, dtype=torch.float32)


def _nf4_codes(scaled: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    # bucketize(right=False) counts the bounds strictly below each value: a value exactly on a
    # midpoint gets the lower level, like the reference.
    return torch.bucketize(scaled, bounds, out_int32=True).to(torch.uint8)


def _pack(codes: torch.Tensor) -> torch.Tensor:
    return (codes[0::2] << 4) | codes[1::2]


def nf4_blocks(weight: torch.Tensor, blocksize: int = NF4_BLOCKSIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """NF4 quantization: (packed uint8 [numel/2 rounded up, 1], float32 absmax [blocks]).

    The weight is read in row-major order as one flat vector; a last partial block is scaled by
    division (the reference's tail path) where full blocks are scaled by a reciprocal multiply.
    """
    flat = weight.reshape(-1)
    n = flat.numel()
    full = n - n % blocksize
    levels = nf4_levels()
    bounds = (levels[:-1] + levels[1:]) / 2
    packed = torch.empty(((n + 1) // 2,), dtype=torch.uint8)
    absmax = torch.empty((-(-n // blocksize),), dtype=torch.float32)
    step = max(blocksize, CHUNK - CHUNK % blocksize)  # whole blocks, an even count of elements
    for e0 in range(0, full, step):
        e1 = min(full, e0 + step)
        blocks = flat[e0:e1].float().view(-1, blocksize)
        am = blocks.abs().amax(dim=1)
        scaled = torch.clamp(blocks * (1.0 / am.clamp(min=1e-38).unsqueeze(1)), -1, 1).view(-1)
        packed[e0 // 2: e1 // 2] = _pack(_nf4_codes(scaled, bounds))
        absmax[e0 // blocksize: e1 // blocksize] = am
    if full < n:
        tail = flat[full:].float()
        am = tail.abs().max().clamp(min=1e-38)
        scaled = torch.clamp(tail / am, -1, 1)
        if scaled.numel() % 2:
            scaled = torch.nn.functional.pad(scaled, (0, 1))
        packed[full // 2:] = _pack(_nf4_codes(scaled, bounds))
        absmax[-1] = am
    return packed.unsqueeze(1), absmax


def nf4_absmax(weight: torch.Tensor, blocksize: int = NF4_BLOCKSIZE) -> torch.Tensor:
    """Just the float32 block absmax of `nf4_blocks` (same values), without quantizing."""
    flat = weight.reshape(-1)
    n = flat.numel()
    full = n - n % blocksize
    absmax = torch.empty((-(-n // blocksize),), dtype=torch.float32)
    step = max(blocksize, CHUNK - CHUNK % blocksize)
    for e0 in range(0, full, step):
        e1 = min(full, e0 + step)
        absmax[e0 // blocksize: e1 // blocksize] = flat[e0:e1].float().view(-1, blocksize).abs().amax(dim=1)
    if full < n:
        absmax[-1] = flat[full:].float().abs().max().clamp(min=1e-38)
    return absmax


def nf4_dequantize(packed: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, ...],
                   blocksize: int = NF4_BLOCKSIZE) -> torch.Tensor:
    """float32 weight from packed NF4 codes and float32 block absmax."""
    flat = packed.reshape(-1)
    codes = torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1).long()
    n = 1
    for d in shape:
        n *= d
    values = nf4_levels()[codes[:n]]
    scale = absmax.repeat_interleave(blocksize)[:n]
    return (values * scale).reshape(shape)


# ---------------------------------------------------------------- double quantization

def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit "dynamic" code (256 sorted float32 values in [-1, 1]).

    Seven decades 1e-6 .. 1: decade i holds 2**i linearly spaced magnitudes (midpoints of
    linspace(0.1, 1, 2**i + 1)) with both signs; plus 0 and 1. Built with the same float32 steps as
    the reference so the table matches bit for bit.
    """
    values: list[float] = []
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        scale = 10 ** (i - 6)
        values += (scale * mids).tolist()
        values += (-scale * mids).tolist()
    values += [0.0, 1.0]
    values.sort()
    return torch.tensor(values, dtype=torch.float32)


def _lookup_table(code: torch.Tensor) -> torch.Tensor:
    """For each of 65,536 evenly spaced points of [-1, 1], the index of the nearest code value
    (the first code whose upper midpoint is not below the point)."""
    points = -1.0 + (torch.arange(_LUT_SIZE, dtype=torch.float32) * 2.0) / float(_LUT_SIZE - 1)
    mids = 0.5 * (code[:-1] + code[1:])
    return torch.searchsorted(mids, points, right=False).to(torch.uint8)


def _fma_f32(a: torch.Tensor, b: float, c: float) -> torch.Tensor:
    """float32 fused multiply-add a * b + c with a single rounding (the native kernel's vfmadd).

    a * b is exact in float64 (24 x 16 significant bits here); the sum is made exact-or-odd with
    TwoSum and round-to-odd, so the final rounding to float32 is the correctly rounded one.
    """
    x = a.double() * b
    s = x + c
    bb = s - x
    err = (x - (s - bb)) + (c - bb)
    toward_zero = torch.where(err < 0, torch.nextafter(s, torch.zeros_like(s)), s)  # s > 0 here
    odd = toward_zero.view(torch.int64) | (err != 0).to(torch.int64)
    return odd.view(torch.float64).float()


def blockwise8(values: torch.Tensor, code: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization of a float32 vector, as bitsandbytes' native CPU kernel:
    (uint8 codes, float32 absmax per block). An all-zero block stores absmax 0 and codes 0."""
    flat = values.reshape(-1).float()
    n = flat.numel()
    lut = _lookup_table(code)
    nblocks = -(-n // blocksize)
    padded = torch.nn.functional.pad(flat, (0, nblocks * blocksize - n)).view(nblocks, blocksize)
    absmax = padded.abs().amax(dim=1)  # padding zeros never raise a maximum
    inv = 1.0 / torch.where(absmax == 0, torch.ones_like(absmax), absmax)
    normed = torch.clamp(padded * inv.unsqueeze(1), -1.0, 1.0)
    half = (normed + 1.0) * 0.5
    index = _fma_f32(half, float(_LUT_SIZE - 1), 0.5).to(torch.int64)  # truncation, as the C cast
    q = lut[index]
    q[absmax == 0] = 0
    return q.reshape(-1)[:n].reshape(values.shape), absmax


def double_quantize(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Compress NF4 block absmax: (uint8 codes, float32 nested absmax, float32 offset scalar).

    The offset is the float32 mean of all absmax values (torch's reduction, as the reference)."""
    offset = absmax.mean()
    q, nested = blockwise8(absmax - offset, dynamic_map(), NESTED_BLOCKSIZE)
    return q, nested, offset


def double_dequantize(q: torch.Tensor, nested: torch.Tensor, offset: float) -> torch.Tensor:
    """float32 NF4 absmax back from its double-quantized form."""
    values = dynamic_map()[q.long()]
    scale = nested.repeat_interleave(NESTED_BLOCKSIZE)[: q.numel()]
    return values * scale + offset
