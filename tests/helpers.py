"""Small helpers shared by tests (not fixtures)."""

from __future__ import annotations

import torch

from xquant.io.writer import ShardedWriter, TensorSpec


def write_safetensors(out_dir, tensors: dict[str, torch.Tensor], max_shard_size: int = 10**12) -> dict[str, str]:
    """Write a dict of tensors through the xquant writer (used to build test inputs)."""
    specs = [TensorSpec(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    writer = ShardedWriter(out_dir, specs, max_shard_size)
    for n, t in tensors.items():
        writer.add(n, t)
    return writer.close()
