"""Shared pieces of the benchmarks: synthetic checkpoints and measured subprocess runs."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from statistics import median
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from xquant.io.writer import ShardedWriter, TensorSpec  # noqa: E402

OUT = Path(os.environ.get("XQUANT_BENCH_DIR", REPO / "bench-out"))

# TinyLlama-1.1B's shapes: LLaMA-2 layout with grouped-query attention, ~2.2 GB in float16.
LLAMA_1B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                num_attention_heads=32, num_key_value_heads=4)


def llama_specs(shape: dict, dtype=torch.float16) -> list[TensorSpec]:
    h, f, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    specs = [TensorSpec("model.embed_tokens.weight", (v, h), dtype)]
    for i in range(shape["num_hidden_layers"]):
        p = f"model.layers.{i}."
        specs += [
            TensorSpec(p + "input_layernorm.weight", (h,), dtype),
            TensorSpec(p + "self_attn.q_proj.weight", (h, h), dtype),
            TensorSpec(p + "self_attn.k_proj.weight", (kv, h), dtype),
            TensorSpec(p + "self_attn.v_proj.weight", (kv, h), dtype),
            TensorSpec(p + "self_attn.o_proj.weight", (h, h), dtype),
            TensorSpec(p + "post_attention_layernorm.weight", (h,), dtype),
            TensorSpec(p + "mlp.gate_proj.weight", (f, h), dtype),
            TensorSpec(p + "mlp.up_proj.weight", (f, h), dtype),
            TensorSpec(p + "mlp.down_proj.weight", (h, f), dtype),
        ]
    specs += [TensorSpec("model.norm.weight", (h,), dtype), TensorSpec("lm_head.weight", (v, h), dtype)]
    return specs


def synthetic_llama(path: Path, shape: dict = LLAMA_1B, dtype=torch.float16, max_shard_size=1_200_000_000,
                    seed: int = 0) -> Path:
    """A random LLaMA-shaped HF checkpoint written tensor by tensor (cached by path)."""
    if (path / "config.json").exists():
        return path
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    specs = llama_specs(shape, dtype)
    g = torch.Generator().manual_seed(seed)
    writer = ShardedWriter(tmp, specs, max_shard_size)
    for s in specs:
        if s.name.endswith("norm.weight"):
            t = torch.ones(s.shape, dtype=dtype)
        else:
            t = (torch.randn(s.shape, generator=g) * 0.02).to(dtype)
        writer.add(s.name, t)
    writer.close()
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "dtype": str(dtype)[6:],
              "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, **shape}
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    os.replace(tmp, path)
    return path


@dataclass
class Run:
    seconds: float
    max_rss: int  # bytes


def measure(cmd: list[str], env: dict | None = None) -> Run:
    """Wall time and peak resident memory of a child process.

    ru_maxrss from wait4 is at least the parent's resident size when it forked (Linux carries it
    across exec); this parent stays below the children's own import of torch, so the figure is
    the child's own peak."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env={**os.environ, "XQUANT_QUIET": "1", **(env or {})})
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"benchmark command failed: {' '.join(cmd)}")
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if usage.ru_maxrss <= own:  # the figure would be this process's peak, not the child's
        print(f"warning: the peak RSS of {Path(cmd[0]).name} ... is floored by the benchmark's own "
              f"{own / 2**20:.2f} GiB (build inputs in a child process)", flush=True)
    return Run(seconds, usage.ru_maxrss * 1024)


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def xquant_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "xquant.cli", *map(str, args)]


@dataclass
class Timed:
    wall: Run  # the whole process: start-up, work, exit
    work: float  # the command's own work, start-up excluded (bench/inproc.py)


def measure_xquant(*args) -> Timed:
    """Run an xquant command in a fresh process, timing the whole process and the work inside it."""
    seconds = OUT / ".inproc-seconds"
    seconds.unlink(missing_ok=True)
    run = measure([sys.executable, str(REPO / "bench" / "inproc.py"), str(seconds), *map(str, args)])
    return Timed(run, float(seconds.read_text()))



def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def print_against_cp(label: str, size: int, cp_runs: list[Run], xq_runs: list[Timed], largest: int) -> None:
    """Best and median of cp and of xquant (work inside the process, and the whole process), their
    throughput ratios against the issues' target of 0.5, and peak RSS against 2 x largest + 1 GiB.
    xquant's first run is left out of the times: it hashes the inputs, later runs use the cache."""
    later = xq_runs[1:]
    cp_best, cp_med = min(r.seconds for r in cp_runs), median(r.seconds for r in cp_runs)
    work, work_med = min(r.work for r in later), median(r.work for r in later)
    wall, wall_med = min(r.wall.seconds for r in later), median(r.wall.seconds for r in later)
    rss = max(r.wall.max_rss for r in xq_runs)
    print(f"cp: best {cp_best:.2f} s ({size / cp_best / 2**20:.0f} MiB/s), median {cp_med:.2f} s")
    print(f"{label}, work inside the process: best {work:.2f} s ({size / work / 2**20:.0f} MiB/s), "
          f"median {work_med:.2f} s")
    print(f"{label}, whole process (+ Python/torch start-up and exit): best {wall:.2f} s, median {wall_med:.2f} s; "
          f"first run with input hashing {xq_runs[0].wall.seconds:.2f} s")
    print(f"throughput ratio, work (cp time / xquant time): best {cp_best / work:.2f}, "
          f"median {cp_med / work_med:.2f}  [target >= 0.5]")
    print(f"throughput ratio, whole process: best {cp_best / wall:.2f}, median {cp_med / wall_med:.2f}")
    bound = 2 * largest + 2**30
    print(f"peak RSS: {gib(rss)} = {rss / largest:.2f} x largest tensor; bound 2 x largest + 1 GiB = {gib(bound)}  "
          f"[{'ok' if rss <= bound else 'OVER'}]")
