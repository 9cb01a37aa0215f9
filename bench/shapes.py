"""Real-shaped LLaMA checkpoints of one or two decoder layers, for benchmarks at real widths.

`checkpoint("70b", layers=1)` is a random float16 HF checkpoint with Llama-2-70B's widths (hidden
8192, ffn 28672, 64 heads / 8 kv heads, vocabulary 32000: 2.57 GiB for one layer with the
embedding and head), built tensor by tensor once and cached under $XQUANT_CACHE/bench (default
~/.cache/xquant/bench). Layers are identical in shape, so what one layer costs times 80 is what
the whole model costs, and a figure that differs between 1 and 2 layers grows with depth.

The tokenizer is the tiny test model's SentencePiece model (2,000 pieces, built once by
xquant.demo.tiny): its ids are valid rows of a 32,000-row embedding, GPTQ tokenizes calibration text
with it, and the GGUF writer pads a SentencePiece vocabulary to the embedding's rows with unused
[PADn] tokens (xquant/gguf/vocab.py), so no 32,000-piece model has to be trained.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from common import synthetic_llama

from xquant.demo import tiny

SHAPES = {
    "7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
               num_key_value_heads=32),
    "13b": dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_attention_heads=40,
                num_key_value_heads=40),
    "70b": dict(vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_attention_heads=64,
                num_key_value_heads=8),
}
FULL_LAYERS = {"7b": 32, "13b": 40, "70b": 80}


def cache_root() -> Path:
    return Path(os.environ.get("XQUANT_CACHE", Path.home() / ".cache" / "xquant")) / "bench"


def layer_bytes(shape: str) -> int:
    """One decoder layer's float16 bytes (its seven linears and two norms)."""
    s = SHAPES[shape]
    h, f = s["hidden_size"], s["intermediate_size"]
    kv = h // s["num_attention_heads"] * s["num_key_value_heads"]
    return 2 * (2 * h * h + 2 * kv * h + 3 * h * f + 2 * h)


def _path(shape: str, layers: int, seed: int) -> Path:
    return cache_root() / f"llama-{shape}-{layers}l-fp16{f'-seed{seed}' if seed else ''}"


def checkpoint(shape: str, layers: int = 1, seed: int = 0) -> Path:
    """The cached checkpoint of `layers` decoder layers with `shape`'s widths (built on first use);
    another seed gives other values of the same shapes (a stand-in delta for apply-delta)."""
    if shape not in SHAPES:
        raise SystemExit(f"unknown shape {shape!r} (known: {', '.join(SHAPES)})")
    path = _path(shape, layers, seed)
    if not (path / "config.json").exists():
        # In a child process: a benchmark's children inherit this process's peak RSS as the floor
        # of their ru_maxrss, so the tensors written here must not pass through it.
        print(f"building {path} (once)", flush=True)
        subprocess.run([sys.executable, __file__, "--build", shape, str(layers), str(seed)], check=True)
    for f in tiny.tokenizer_dir().iterdir():
        if not (path / f.name).exists():
            shutil.copy2(f, path / f.name)
    return path


if __name__ == "__main__":
    import argparse

    if sys.argv[1:2] == ["--build"]:
        shape, layers, seed = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
        synthetic_llama(_path(shape, layers, seed),
                        {**SHAPES[shape], "num_hidden_layers": layers}, max_shard_size=2_000_000_000, seed=seed)
        sys.exit(0)

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="7b", choices=sorted(SHAPES))
    p.add_argument("--layers", type=int, default=1)
    a = p.parse_args()
    print(checkpoint(a.shape, a.layers))
