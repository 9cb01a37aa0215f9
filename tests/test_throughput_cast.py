"""The block-parallel cast (io/finite.py `cast_into`, `cast_file_into`) against torch's own `.to()`,
bit for bit: every float16 and every bfloat16 value, random float32 bit patterns, NaN, inf,
subnormals and -0.0, cut into many small blocks on several threads. A deliberately broken
cast must be caught by the same comparison (so the test can fail)."""

from __future__ import annotations

import threading

import pytest
import torch

from xquant.io import finite, pool
from xquant.io.finite import cast_file_into, cast_into

HALF = (torch.float16, torch.bfloat16)
FLOATS = (torch.float32, torch.float16, torch.bfloat16)


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Blocks and tasks of odd sizes, so that a few thousand values make many of each (with
    ragged ends) and several threads share them."""
    monkeypatch.setattr(finite, "BLOCK", 1000)
    monkeypatch.setattr(finite, "TASK", 4099)


def every_value(dtype: torch.dtype) -> torch.Tensor:
    """All 65,536 bit patterns of a 16-bit float type."""
    return torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(dtype)


def random_float32(n: int, seed: int) -> torch.Tensor:
    """Random bit patterns (every exponent, subnormals included) and the edges."""
    g = torch.Generator().manual_seed(seed)
    bits = torch.randint(-2**31, 2**31, (n,), generator=g, dtype=torch.int64).to(torch.int32)
    x = bits.view(torch.float32).clone()
    edges = [0.0, -0.0, 1e-45, -1e-45, 1.1754942e-38, 65504.0, 65520.0, -65519.99, 3.3895314e38,
             3.4028235e38, 5.96e-8, 2.98e-8, 1.0 + 2**-8, 1.0 + 3 * 2**-9]
    x[: len(edges)] = torch.tensor(edges)
    return x


def finite_only(t: torch.Tensor) -> torch.Tensor:
    return t[torch.isfinite(t)].contiguous()


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(_bits(a), _bits(b))


def differing(a: torch.Tensor, b: torch.Tensor) -> int:
    return int((_bits(a) != _bits(b)).sum())


def check_cast(src: torch.Tensor, dtype: torch.dtype, threads: int = 3) -> bool:
    """cast_into against .to(): the bits must match; returns what cast_into said about finiteness."""
    out = torch.empty(src.shape, dtype=dtype)
    finite_said = cast_into(src, out, threads=threads)
    expected = src.to(dtype)
    assert same_bits(out, expected), f"{src.dtype} -> {dtype}: {differing(out, expected)} values differ"
    if finite_said:
        assert bool(torch.isfinite(expected).all()), f"{src.dtype} -> {dtype}: inf/NaN reported as finite"
    return finite_said


@pytest.mark.parametrize("src_dtype,dtype", [(a, b) for a in HALF for b in FLOATS if a != b], ids=str)
def test_every_half_value_casts_as_torch(src_dtype, dtype):
    every = every_value(src_dtype)
    # finite values only: the fast path (staged through float32 for half <-> half) must be exact
    finite_values = finite_only(every)
    said = check_cast(finite_values, dtype)
    if not bool(torch.isfinite(finite_values.to(dtype)).all()):  # bfloat16 -> float16 overflows
        assert said is False
    # weights' range: reported finite (beyond it, a float32 sum of the scan may overflow: a false
    # alarm that only costs a second scan)
    assert check_cast(finite_values[finite_values.abs() <= 1e4].contiguous(), dtype) is True
    # with NaN and inf: reported, and the result is still .to()'s, NaN bits included
    assert check_cast(every, dtype) is False


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("seed", range(3))
def test_random_float32_bits_cast_as_torch(dtype, seed):
    x = random_float32(50_000, seed)
    check_cast(finite_only(x), dtype)
    assert check_cast(x, dtype) is False  # the random patterns hold NaN and inf
    check_cast(finite_only(x).to(dtype), torch.float32)  # and back


def test_shapes_and_single_thread():
    x = finite_only(every_value(torch.float16))[:59_400].reshape(297, 200)
    check_cast(x, torch.bfloat16, threads=1)
    check_cast(x[::2], torch.bfloat16)  # a strided source
    check_cast(torch.tensor(1.5, dtype=torch.float16), torch.bfloat16)  # 0-dim
    check_cast(torch.empty(0, 7, dtype=torch.float16), torch.bfloat16)


@pytest.mark.parametrize("offset", [0, 4096, 6])
def test_cast_from_file_windows(tmp_path, offset):
    values = finite_only(every_value(torch.float16))
    path = tmp_path / "t.bin"
    path.write_bytes(b"x" * offset + values.view(torch.uint8).numpy().tobytes() + b"tail")
    out = torch.empty(values.shape, dtype=torch.bfloat16)
    assert cast_file_into(path, offset, torch.float16, out, threads=3)
    assert same_bits(out, values.to(torch.bfloat16))
    bad = every_value(torch.float16)
    path.write_bytes(b"x" * offset + bad.view(torch.uint8).numpy().tobytes())
    out = torch.empty(bad.shape, dtype=torch.bfloat16)
    assert not cast_file_into(path, offset, torch.float16, out, threads=3)
    assert same_bits(out, bad.to(torch.bfloat16))


def test_a_broken_cast_is_caught(monkeypatch):
    """The comparison above must fail for a cast that is wrong in a way a fast path could be:
    bfloat16 by truncating float32 (dropping the low half) instead of rounding to nearest even."""
    def truncating(src, out):
        for b in range(0, src.numel(), finite.BLOCK):
            f32 = src[b: b + finite.BLOCK].to(torch.float32)
            out[b: b + finite.BLOCK].view(torch.int16).copy_((f32.view(torch.int32) >> 16).to(torch.int16))
        return True

    real = finite._cast_span
    monkeypatch.setattr(finite, "_cast_span", truncating)
    with pytest.raises(AssertionError, match="values differ"):
        check_cast(finite_only(every_value(torch.float16)), torch.bfloat16)
    # and one that keeps the float32-staged result for NaN instead of redoing it directly
    monkeypatch.setattr(finite, "_cast_span", lambda src, out: real(src, out) or True)
    with pytest.raises(AssertionError, match="values differ"):
        check_cast(every_value(torch.float16), torch.bfloat16)


def test_parallel_map_order_threads_and_errors():
    seen = set()

    def f(i):
        seen.add(threading.current_thread().name)
        return i * i

    assert pool.parallel_map(f, range(200), threads=8) == [i * i for i in range(200)]
    assert pool.parallel_map(f, [], threads=4) == []
    assert pool.parallel_map(f, range(5), threads=1) == [0, 1, 4, 9, 16]

    def boom(i):
        if i == 37:
            raise KeyError("item 37")
        return i

    with pytest.raises(KeyError, match="item 37"):
        pool.parallel_map(boom, range(100), threads=4)


def test_waiting_pool_hands_back_the_buffer_or_fresh_memory_after_the_wait():
    p = pool.BufferPool(1024, count=1, wait=5.0)
    a = p.empty((256,), torch.float32)
    got = []
    t = threading.Thread(target=lambda: got.append(p.empty((16,), torch.float32)))
    t.start()
    t.join(0.2)
    assert t.is_alive() and not got  # waiting for the one buffer
    p.recycle(a)
    t.join(5)
    assert got and got[0].data_ptr() == a.data_ptr()  # the same pages again
    quick = pool.BufferPool(1024, count=1, wait=0.05)
    b = quick.empty((256,), torch.float32)
    assert quick.empty((256,), torch.float32).data_ptr() != b.data_ptr()  # fresh memory after the wait
