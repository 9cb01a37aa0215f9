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


# llama.cpp on one thread: bitwise-stable logits, and faster than two on a busy 2-core machine.
LLAMA_THREADS = dict(n_threads=1, n_threads_batch=1)


def llama_cpp_logits(path, ids: list[int], dtype=torch.float64) -> torch.Tensor:
    """Logits of every position of `ids` from a GGUF file in llama.cpp (f32 KV cache)."""
    import numpy as np

    from xquant.gguf.kquant import load_llama

    llm = load_llama(path, n_ctx=512, f32_cache=True, **LLAMA_THREADS)
    try:
        llm.eval(ids)
        return torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float64)).to(dtype)
    finally:
        llm.close()
