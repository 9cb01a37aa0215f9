"""The q8_0 encoder (gguf/cquant.py `q8_0_rows`, run in row tasks by gguf/writer.py
`encode_checked`) against ggml's own C rows and gguf-py's reference, byte for byte: random
blocks over many magnitudes, zeros, -0.0, exact ties of the half-away rounding, values just
below a half, subnormals, a scale beyond float16; NaN/inf blocks go to the C rows as before.
A rounding rule that is almost right must be caught."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from xquant.gguf import cquant, writer
from xquant.gguf.writer import encode_checked

BELOW_HALF = float(np.nextafter(np.float32(0.5), np.float32(0)))


def blocks(seed: int, rows: int = 96, cols: int = 512) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, cols)).astype(np.float32) * rng.lognormal(0, 3, (rows, 1)).astype(np.float32)
    x[0, :64] = 0.0                                     # all-zero blocks (scale 0)
    x[1, :32] = -0.0
    x[2, :] = np.round(x[2, :] * 2) / 2                 # ties of the rounding
    x[3, 7] = 1e30                                      # a scale beyond float16
    x[4, :] = rng.integers(-127, 128, cols) / 127.0     # exact grid values
    x[5, :] = np.float32(1e-40)                         # subnormals: 1 / d overflows
    x[6, ::32] = -x[6, ::32] * 50                       # one outlier per block
    # scale exactly 1 (max 127): x * (1 / d) is x, so these are the rounding's edge cases
    row = np.tile(np.float32([127, BELOW_HALF, -BELOW_HALF, 0.5, -0.5, 1.5, -2.5, 126.5, -126.5, 3.0,
                              np.nextafter(np.float32(1.5), np.float32(0)), 2.5000002]), cols // 12 + 1)[:cols]
    row[::32] = 127
    x[7, :] = row
    return torch.from_numpy(x)


def reference(x: torch.Tensor) -> np.ndarray:
    """The bytes before this encoder: ggml's C rows over float32, else gguf-py's."""
    x32 = np.ascontiguousarray(x.to(torch.float32).numpy())
    out = np.empty((x32.shape[0], x32.shape[1] // 32 * 34), np.uint8)
    if not cquant.quantize(x32, Q.Q8_0, out):
        with np.errstate(all="ignore"):
            out = gguf.quants.quantize(x32, Q.Q8_0)
    return out


def q8_0(x: torch.Tensor) -> tuple[np.ndarray, bool]:
    rows, cols = x.shape
    out = torch.empty(rows, cols // 32 * 34, dtype=torch.uint8)
    ok = cquant.q8_0_rows(x.contiguous(), out, torch.empty(rows * cols))
    return out.numpy(), ok


@pytest.mark.parametrize("seed", range(4))
def test_q8_0_rows_equal_ggml_and_gguf_py(seed):
    x = blocks(seed)
    x[5, :] = 0.25  # subnormals are the C rows' (tested below through encode)
    ours, ok = q8_0(x)
    assert ok
    assert np.array_equal(ours, reference(x)), f"seed {seed}: rows {np.nonzero((ours != reference(x)).any(1))[0]}"
    with np.errstate(all="ignore"):
        assert np.array_equal(ours, gguf.quants.quantize(x.numpy(), Q.Q8_0))


def test_nonfinite_and_subnormal_blocks_are_left_to_the_c_rows():
    for bad in (float("nan"), float("inf"), -float("inf"), 1e-40):
        x = blocks(9)
        x[5, :] = 0.25
        x[3, 40] = bad
        if bad == 1e-40:  # a whole block of subnormals
            x[3, 32:64] = bad
        assert q8_0(x)[1] is False, bad


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("cols", [512, 4096, 96])
def test_encode_q8_0_equals_the_c_rows(monkeypatch, dtype, cols):
    """Through the row tasks (small, so a tensor makes many, on several threads), from every
    source dtype, with NaN/inf and subnormal rows (which take the C rows) in the mix."""
    monkeypatch.setattr(writer, "TASK_VALUES", 3 * cols + 17)
    x = blocks(5, rows=200, cols=cols)
    if dtype == torch.float32:
        x[20, 3], x[150, 0] = float("nan"), -float("inf")
    src = x.to(dtype)  # float16 turns the largest values into inf
    arr, finite = encode_checked(src, Q.Q8_0, threads=3)
    assert finite is bool(torch.isfinite(src).all())
    assert np.array_equal(arr, reference(src))


def test_a_rounding_almost_right_is_caught(monkeypatch):
    """Adding 0.5 before truncating is roundf except for values just below a half: the edge row
    must show it."""
    monkeypatch.setattr(cquant, "_BELOW_HALF", 0.5)
    x = blocks(0)
    x[5, :] = 0.25
    ours, ok = q8_0(x)
    assert ok and not np.array_equal(ours, reference(x))


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q5_1], ids=lambda q: q.name)
def test_other_types_unchanged(qtype):
    """The same bytes as the encoder before the row tasks: .to() for the float types, one call of
    the C rows (or gguf-py) over the float32 tensor for the others."""
    x = blocks(3, rows=64, cols=256)
    x = (x / x.abs().amax(dim=1, keepdim=True).clamp_min(1e-30) * 300).to(torch.float16)
    arr, finite = encode_checked(x, qtype, threads=2)
    assert finite
    if qtype in (Q.F32, Q.F16, Q.BF16):
        dtype = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}[qtype]
        assert arr.tobytes() == x.to(dtype).numpy().tobytes() if dtype != torch.bfloat16 else \
            arr.tobytes() == x.to(dtype).view(torch.int16).numpy().tobytes()
    else:
        x32 = x.float().numpy()
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        ref = np.empty((64, 256 // block * size), np.uint8)
        if not cquant.quantize(x32, qtype, ref):
            with np.errstate(all="ignore"):
                ref = gguf.quants.quantize(x32, qtype)
        assert np.array_equal(arr, ref)


def test_metadata_arrays_pack_as_gguf_py(tmp_path):
    """The writer packs a flat array in one go; the bytes must be gguf-py's, item by item."""
    V = gguf.GGUFValueType
    ours, theirs = writer._Writer([tmp_path / "x.gguf"], "llama", 0), gguf.GGUFWriter(None, "llama")
    cases = [(["<s>", "é", "", "▁the"] * 50, None), ([1.5, -2.0, 1e-40, 3.4e38, -1000.0], None), ([1, 2, -3], None),
             ([True, False], None), ([1, 2, 3], V.UINT32), ([0, 255], V.UINT8), ([1.0, -0.0], V.FLOAT64),
             ([b"x", b"yz"], None), ([1, 2.0], None), ([[1, 2], [3]], None)]
    for val, sub in cases:
        for add_vtype in (True, False):
            try:
                expected = theirs._pack_val(val, V.ARRAY, add_vtype, sub)
            except ValueError:
                with pytest.raises(ValueError):
                    ours._pack_val(val, V.ARRAY, add_vtype, sub)
                continue
            assert ours._pack_val(val, V.ARRAY, add_vtype, sub) == expected, (val[:3], sub)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_1, Q.F16], ids=lambda q: q.name)
def test_parts_are_handed_on_in_order(monkeypatch, qtype):
    """The writer appends the parts `done` receives as they come: together, in order, they must be
    the whole encoding."""
    monkeypatch.setattr(writer, "TASK_VALUES", 3 * 256)
    monkeypatch.setattr(writer, "SEGMENT_VALUES", 10 * 256)
    x = (blocks(2, rows=101, cols=256) * 1e-3).to(torch.bfloat16)
    parts: list[np.ndarray] = []
    arr, _ = encode_checked(x, qtype, threads=3, done=lambda p: parts.append(p.copy()))
    assert len(parts) == 1 if qtype == Q.F16 else len(parts) == 12  # segments of 9 rows (3 tasks of 3)
    assert b"".join(p.tobytes() for p in parts) == arr.tobytes()
