"""The direct GGUF types are quantized by ggml's own C rows (libggml-base from llama-cpp-python);
their bytes must be exactly gguf-py's reference rows, on many generated blocks, and the writer
must give the same bytes when the C library is absent."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from xquant.gguf import cquant
from xquant.gguf.writer import encode

pytest.importorskip("llama_cpp")


def _blocks(seed: int, rows: int = 300, cols: int = 1024) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, cols)).astype(np.float32) * rng.lognormal(0, 3, (rows, 1)).astype(np.float32)
    x[0, :64] = 0.0                                   # all-zero blocks (scale 0)
    x[1, :32] = -0.0
    x[2, :] = np.round(x[2, :] * 2) / 2               # ties for the rounding rule
    x[3, 7] = 1e30                                    # a scale beyond float16
    x[4, :] = rng.integers(-127, 128, cols) / 127.0   # exact grid values
    x[5, :] = np.float32(1e-40)                       # subnormals
    x[6, ::32] = -x[6, ::32] * 50                     # one outlier per block
    return x


@pytest.mark.parametrize("qtype", cquant.DIRECT, ids=lambda q: q.name)
@pytest.mark.parametrize("seed", range(4))
def test_c_rows_equal_gguf_py(qtype, seed):
    x = _blocks(seed)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    out = np.empty((x.shape[0], x.shape[1] // block * size), np.uint8)
    with np.errstate(all="ignore"):
        ref = gguf.quants.quantize(x, qtype)
    assert cquant.quantize(x, qtype, out, threads=2)
    # The two agree byte for byte except for the sign of a zero scale (blocks of zeros: ggml keeps
    # -0.0, numpy +0.0), which dequantizes to the same zeros.
    diff = np.nonzero(out != ref)
    assert set(out[diff].tolist()) | set(ref[diff].tolist()) <= {0x00, 0x80}, f"seed {seed}: {diff[0][:5]}"
    with np.errstate(all="ignore"):
        a, b = gguf.quants.dequantize(out, qtype), gguf.quants.dequantize(ref, qtype)
    assert np.array_equal(a, b, equal_nan=True), f"seed {seed}"
    assert (out != ref).any(axis=1).sum() <= 4  # only the rows made with zero blocks


def test_encode_is_the_same_without_the_c_library(monkeypatch):
    t = torch.from_numpy(_blocks(7, rows=64))
    with_c = encode(t, gguf.GGMLQuantizationType.Q8_0)
    monkeypatch.setattr(cquant, "_lib", lambda: None)
    assert not cquant.available()
    with np.errstate(all="ignore"):
        without = encode(t, gguf.GGMLQuantizationType.Q8_0)
    assert np.array_equal(with_c, without)
