"""Mapping between torch dtypes, safetensors dtype codes and user-facing names."""

from __future__ import annotations

import torch

from ..errors import UnsupportedError

# safetensors' dtype codes, as the format specification names them.
ST_TO_TORCH: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
TORCH_TO_ST = {v: k for k, v in ST_TO_TORCH.items()}

USER_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def parse_dtype(name: str) -> torch.dtype:
    """'float16' / 'fp16' / 'bfloat16' / 'float32' -> torch dtype."""
    try:
        return USER_DTYPES[name.lower()]
    except KeyError:
        known = ", ".join(sorted({"float32", "float16", "bfloat16"}))
        raise UnsupportedError(f"unknown dtype '{name}' (known: {known})") from None


def dtype_name(dtype: torch.dtype) -> str:
    """torch.float16 -> 'float16' (the spelling config.json uses)."""
    return str(dtype).removeprefix("torch.")


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def parse_size(text: str | int) -> int:
    """'5GB' -> 5_000_000_000, '500MiB' -> 524_288_000 (decimal and binary units, as transformers)."""
    if isinstance(text, int):
        return text
    s = text.strip().upper().replace(" ", "")
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
             "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    for unit, factor in units.items():
        if s.endswith(unit):
            number = s[: -len(unit)]
            break
    else:
        number, factor = s, 1
    try:
        value = int(float(number) * factor)
    except ValueError:
        raise UnsupportedError(f"cannot read size '{text}' (examples: 5GB, 500MB, 2GiB)") from None
    if value <= 0:
        raise UnsupportedError(f"size must be positive, got '{text}'")
    return value


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"
