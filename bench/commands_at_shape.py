"""Every command at real widths: time per layer and peak RSS with one and with two decoder layers.

Checkpoints from bench/shapes.py (random float16, 7B widths by default, `--shape 13b` or
`--shape 70b` opt-in). Each command runs as a child process on the 1-layer and on the 2-layer
checkpoint; printed per command: wall time and peak RSS (ru_maxrss) of both, the peak ratio (1.00
when nothing grows with depth), the time of one more layer (2-layer run minus 1-layer run) and the
extrapolation to the full depth, time(1 layer) + (depth - 1) x that. The embedding and the head
(2 x 32000 rows) are in both runs, so the per-layer time excludes them.

    python bench/commands_at_shape.py                          # 7B widths, every command
    python bench/commands_at_shape.py --shape 70b --skip gptq  # the 70B widths without GPTQ's hour
"""

from __future__ import annotations

import argparse
import os
import shutil

from common import gib, measure, xquant_cmd
from shapes import FULL_LAYERS, SHAPES, cache_root, checkpoint

COMMANDS = {
    "convert copy": lambda src, out, delta: ["convert", src, out],
    "convert bf16": lambda src, out, delta: ["convert", src, out, "--dtype", "bfloat16"],
    "apply-delta": lambda src, out, delta: ["apply-delta", "--base", src, "--delta", delta, "--out", out],
    "int8": lambda src, out, delta: ["int8", src, out],
    "nf4": lambda src, out, delta: ["nf4", src, out],
    "gptq": lambda src, out, delta: ["gptq", src, out, "--bits", "4", "--samples", "8", "--seq-len", "512"],
    "gguf f16": lambda src, out, delta: ["gguf", src, f"{out}.gguf", "--outtype", "f16"],
    "gguf q8_0": lambda src, out, delta: ["gguf", src, f"{out}.gguf", "--outtype", "q8_0"],
    "gguf q4_k_m": lambda src, out, delta: ["gguf", src, f"{out}.gguf", "--outtype", "q4_k_m"],
}


def run_once(name: str, shape: str, layers: int):
    src = checkpoint(shape, layers)
    delta = checkpoint(shape, layers, seed=1) if name == "apply-delta" else None
    out = cache_root() / f"out-{shape}-{layers}l-{name.replace(' ', '-')}"
    shutil.rmtree(out, ignore_errors=True)
    out.with_name(out.name + ".gguf").unlink(missing_ok=True)
    try:
        return measure(xquant_cmd(*COMMANDS[name](src, out, delta)))
    finally:
        shutil.rmtree(out, ignore_errors=True)
        out.with_name(out.name + ".gguf").unlink(missing_ok=True)


def main() -> None:
    p = argparse.ArgumentParser(description="every xquant command at real widths, 1 vs 2 layers")
    p.add_argument("--shape", default="7b", choices=sorted(SHAPES))
    p.add_argument("--only", action="append", choices=sorted(COMMANDS), help="repeatable; default all")
    p.add_argument("--skip", action="append", default=[], choices=sorted(COMMANDS))
    a = p.parse_args()
    depth = FULL_LAYERS[a.shape]
    print(f"{a.shape} widths ({SHAPES[a.shape]}); {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    print(f"{'command':<13} {'1 layer':>8} {'2 layers':>8} {'peak 1 L':>10} {'peak 2 L':>10} {'ratio':>6} "
          f"{'s/layer':>8} {f'{depth} layers':>10}")
    for name in a.only or list(COMMANDS):
        if name in a.skip:
            continue
        one, two = run_once(name, a.shape, 1), run_once(name, a.shape, 2)
        per_layer = two.seconds - one.seconds
        full = one.seconds + (depth - 1) * per_layer
        print(f"{name:<13} {one.seconds:>7.1f}s {two.seconds:>7.1f}s {gib(one.max_rss):>10} {gib(two.max_rss):>10} "
              f"{two.max_rss / one.max_rss:>6.2f} {per_layer:>7.1f}s {full / 60:>8.1f} min", flush=True)


if __name__ == "__main__":
    main()
