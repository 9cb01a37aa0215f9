"""Small helpers shared by tests (not fixtures)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

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


def hf_logits(model, ids, dtype: torch.dtype = torch.float32, window: int = 512,
              load_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Logits [len(ids), vocab] of a transformers causal LM on token ids, converted to `dtype`.

    `model` is a loaded model or an HF directory (then loaded in `load_dtype`). `ids` is a list or
    a tensor (flattened); sequences longer than `window` run window by window, each its own context.
    """
    if isinstance(model, (str, Path)):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model, dtype=load_dtype)
    ids = torch.as_tensor(ids).reshape(-1)
    with torch.inference_mode():
        return torch.cat([model(ids[None, j:j + window]).logits[0] for j in range(0, len(ids), window)]).to(dtype)


def copy_model(src: Path, dst: Path, edit: Callable | None = None, config_edit: Callable | None = None,
               keep: Callable[[str], bool] | None = None) -> Path:
    """A copy of an HF model directory, to modify: `edit(tensors)` changes the name -> tensor dict in
    place (the tensors are then written through the xquant writer, one shard; without `edit` the
    tensor files are copied as they are), `config_edit(config)` changes config.json in place, and
    the other files are copied when `keep(name)` (default: all of them)."""
    src, dst = Path(src), Path(dst)
    dst.mkdir()
    tensor_files = {f for f in src.iterdir() if f.name.endswith((".safetensors", ".safetensors.index.json"))}
    if edit:
        from xquant.io.readers import open_hf_tensors

        reader = open_hf_tensors(src)
        tensors = {n: reader.get(n) for n in reader.names()}
        edit(tensors)
        write_safetensors(dst, tensors)
    else:
        for f in tensor_files:
            shutil.copy2(f, dst / f.name)
    config = json.loads((src / "config.json").read_text())
    if config_edit:
        config_edit(config)
    (dst / "config.json").write_text(json.dumps(config))
    for f in src.iterdir():
        if f not in tensor_files and f.name != "config.json" and (keep is None or keep(f.name)):
            (shutil.copytree if f.is_dir() else shutil.copy2)(f, dst / f.name)
    return dst


def no_leftovers(parent: Path, allowed: set[str]) -> None:
    """Nothing in `parent` but the names in `allowed` (no temporary or half-written outputs)."""
    names = sorted(p.name for p in Path(parent).iterdir())
    assert set(names) <= allowed, names


def gptq_committed_layer(out: Path) -> int:
    """The last decoder layer the GPTQ resume state of output `out` has committed (-1: none).

    A layer is committed once state.json says so: it is renamed into place after the layer's
    tensors and the next layer's inputs (xquant/quant/gptq/state.py)."""
    from xquant.quant.gptq.state import STATE_FILE, state_dir_for

    try:
        return int(json.loads((state_dir_for(out) / STATE_FILE).read_text())["done"])
    except (OSError, ValueError, KeyError, TypeError):
        return -1


def kill_after_gptq_layer(args, out: Path, layer: int = 0, env: dict | None = None, timeout: float = 300) -> int:
    """Run `xquant ARGS` in a subprocess and SIGKILL it (a crash: no clean-up, no exit handler) as
    soon as the GPTQ resume state of output `out` has committed decoder layer `layer`.

    Returns the last layer committed when the process died (the run may get one more in before the
    signal lands). Fails if the process ends by itself or `timeout` passes first."""
    full_env = {**os.environ, "XQUANT_QUIET": "1", **(env or {})}
    if not (env and "XQUANT_DEBUG" in env):
        full_env.pop("XQUANT_DEBUG", None)
    with tempfile.TemporaryFile("w+") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "xquant.cli", *map(str, args)], env=full_env,
                                stdout=subprocess.DEVNULL, stderr=stderr)
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline and gptq_committed_layer(out) < layer:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        code = proc.wait()
        stderr.seek(0)
        committed = gptq_committed_layer(out)
        assert committed >= layer and code == -signal.SIGKILL, (
            f"xquant {' '.join(map(str, args))} ended ({code}) or timed out before committing layer {layer} "
            f"(committed: {committed}):\n{stderr.read()[-2000:]}")
    return committed
