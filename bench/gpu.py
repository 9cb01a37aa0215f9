"""GPTQ and the report on a CUDA device: time per layer, peak device memory, and agreement with CPU.

Prints nothing but one line on a machine without CUDA (nothing requires a GPU). With one:
1. `xquant gptq --device cuda` on the real-shaped one-layer checkpoints of bench/shapes.py (7B
   widths by default; `--shape 13b --shape 70b` add more) with the calibration a GPU user runs
   (`--samples 128 --seq-len 2048` by default): seconds per layer from the manifest, the layer's
   peak device memory (the walker records torch's max_memory_allocated per layer), the peak RSS of
   the process, and the extrapolation to the full depth.
2. CPU against CUDA on the tests' quantization-sensitive tiny model (same windows: same sampler,
   seed and options): the share of 4-bit codes that differ, and each artifact's perplexity change
   and mean KL to float32 on the held-out text (a GPU's float32 sums round differently, so a few
   codes near a rounding boundary may flip; the quality must not change).
3. `xquant report --device cuda` against `--device cpu` on that tiny GPTQ artifact: wall time.

    python bench/gpu.py                      # 7B widths
    python bench/gpu.py --shape 70b --samples 32 --seq-len 2048
    python bench/gpu.py --self-check         # parts 2-3 with CPU for CUDA: checks the script itself
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import torch

from common import OUT, REPO, gib, measure, xquant_cmd
from shapes import FULL_LAYERS, SHAPES, checkpoint

sys.path.insert(0, str(REPO / "tests"))  # the sensitive tiny model's builder


def gptq_at_shape(shape: str, samples: int, seq_len: int) -> None:
    src = checkpoint(shape, 1)
    out = OUT / f"gpu-gptq-{shape}"
    shutil.rmtree(out, ignore_errors=True)
    r = measure(xquant_cmd("gptq", src, out, "--bits", "4", "--device", "cuda", "--samples", samples,
                           "--seq-len", seq_len))
    rows = json.loads((out / "xquant-manifest.json").read_text())["gptq"]["layers"]
    shutil.rmtree(out, ignore_errors=True)
    per_layer = sum(row["seconds"] for row in rows) / len(rows)
    device_peak = max(row.get("peak_device_bytes", 0) for row in rows)
    full = FULL_LAYERS[shape] * per_layer
    print(f"{shape:>5} {samples:>4}x{seq_len:<5} {per_layer:>8.1f} {gib(device_peak):>12} {gib(r.max_rss):>10} "
          f"{r.seconds:>8.1f} {full / 60:>8.1f} min", flush=True)


def cpu_against_cuda(samples: int, seq_len: int, gpu: str = "cuda") -> None:
    from gptq_fixtures import outlier_model_dir
    from gptq_vs_gptqmodel import Scorer

    from xquant.quant.gptq.pack import unpack_qweight
    from xquant.io.readers import open_hf_tensors

    src = outlier_model_dir()
    outs = {}
    for device in ("cpu", gpu):
        outs[device] = OUT / f"gpu-tiny-{device}"
        shutil.rmtree(outs[device], ignore_errors=True)
        r = measure(xquant_cmd("gptq", src, outs[device], "--bits", "4", "--device", device,
                               "--samples", samples, "--seq-len", seq_len))
        print(f"tiny model gptq --device {device}: {r.seconds:.1f} s, peak RSS {gib(r.max_rss)}")
    on_cpu, on_gpu = open_hf_tensors(outs["cpu"]), open_hf_tensors(outs[gpu])
    differ = total = 0
    for name in on_cpu.names():
        if name.endswith(".qweight"):
            a, b = unpack_qweight(on_cpu.get(name), 4), unpack_qweight(on_gpu.get(name), 4)
            differ += int((a != b).sum())
            total += a.numel()
    print(f"4-bit codes differing between CPU and CUDA: {differ:,} of {total:,} ({differ / total:.3%})")
    scorer = Scorer(src)
    for device, path in outs.items():
        s = scorer.score(path)
        print(f"  {device}: ppl {s.ppl:.3f} (fp32 {scorer.fp32_ppl:.3f}, Δ {s.ppl - scorer.fp32_ppl:+.3f}), "
              f"mean KL {s.kl:.3e}")
    for device in ("cpu", gpu):
        report = OUT / f"gpu-report-{device}"
        shutil.rmtree(report, ignore_errors=True)
        t0 = time.perf_counter()
        subprocess.run(xquant_cmd("report", src, outs[gpu], "--out", report, "--device", device), check=True,
                       stdout=subprocess.DEVNULL, env={**os.environ, "XQUANT_QUIET": "1"})
        print(f"report --device {device}: {time.perf_counter() - t0:.1f} s")
        shutil.rmtree(report, ignore_errors=True)
    for path in set(outs.values()):
        shutil.rmtree(path, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description="xquant on a CUDA device")
    p.add_argument("--shape", action="append", choices=sorted(SHAPES), help="repeatable; default 7b")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--self-check", action="store_true",
                   help="run part 2 and 3 with the CPU in place of CUDA (checks this script without a GPU)")
    a = p.parse_args()
    if a.self_check:
        OUT.mkdir(parents=True, exist_ok=True)
        cpu_against_cuda(16, 256, gpu="cpu")
        return
    if not torch.cuda.is_available():
        print("no CUDA device visible to torch: the GPU benchmark has nothing to measure on this machine")
        return
    OUT.mkdir(parents=True, exist_ok=True)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {os.cpu_count()} CPUs")
    print(f"{'shape':>5} {'windows':>10} {'s/layer':>8} {'device peak':>12} {'peak RSS':>10} {'process':>8} "
          f"{'full depth':>12}")
    for shape in a.shape or ["7b"]:
        gptq_at_shape(shape, a.samples, a.seq_len)
    cpu_against_cuda(64, 256)


if __name__ == "__main__":
    main()
