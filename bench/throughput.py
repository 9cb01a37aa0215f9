"""Throughput against the hash-bound limit: `convert --dtype bfloat16` and `gguf --outtype q8_0` at
real widths (issue 16, item 5).

Every byte a command writes is also hashed (sha256 into the manifest, ~1.3 GB/s on one core
here), so no command can beat reading its input, writing its output and hashing that output.
The limit is measured, in the same run as the commands and on the same warm page cache, as
exactly that work done by standard tools one after the other:

    cat SRC/*.safetensors > /dev/null      read every input byte
    cp OUTPUT COPY                         write as many bytes as the command wrote (its own output)
    openssl dgst -sha256 COPY              hash them

one child process, timed as a whole. The hash is OpenSSL's, the code Python's hashlib runs for
xquant (coreutils' sha256sum has its own, 6x slower here: it would flatter every command). The
limit does no arithmetic at all (no cast, no quantization, no NaN/inf scan) and uses one core at
a time; a command may overlap the three on several cores, so a ratio above 1 is possible. cp's copy also reads the output it copies, which a command does
not; on a warm page cache that read is a memory copy, a small share of the limit.

Printed per command: the best and median time of the whole process and of its work inside the
process (bench/inproc.py: Python and torch start-up left out, ~1.3 s per command whatever the
model's size), the limit's, their ratio (limit time / command time; the target is >= 0.5), and
the peak RSS against the bound of 2 x the largest tensor + 1 GiB. Each command runs once before
the timed runs (it hashes the inputs once; later runs find them in the cache, as a re-run does).

    python bench/throughput.py              # 1 layer of Llama-2-70B's widths (2.6 GB, ~3 min)
    python bench/throughput.py --shape 7b   # 1 layer of 7B's widths (0.9 GB, quick)
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
from pathlib import Path
from statistics import median

from common import OUT, Run, Timed, gib, measure, measure_xquant
from shapes import SHAPES, cache_root, checkpoint

from xquant.io.readers import open_hf_tensors

COMMANDS = {
    "convert bf16": lambda src, out: ["convert", src, out, "--dtype", "bfloat16"],
    "gguf q8_0": lambda src, out: ["gguf", src, out, "--outtype", "q8_0"],
}


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    Path(f"{path}.xquant-manifest.json").unlink(missing_ok=True)


def _output_files(out: Path) -> list[Path]:
    """What the command wrote that the limit must write and hash too: the tensor files."""
    if out.is_dir():
        return sorted(out.glob("*.safetensors"))
    return [out]


def _limit(src: Path, outputs: list[Path], copy: Path) -> Run:
    inputs = " ".join(shlex.quote(str(p)) for p in sorted(src.glob("*.safetensors")))
    copy.mkdir(parents=True, exist_ok=True)
    copies = [copy / p.name for p in outputs]
    script = (f"cat {inputs} > /dev/null && "
              + " && ".join(f"cp {shlex.quote(str(o))} {shlex.quote(str(c))}" for o, c in zip(outputs, copies))
              + " && openssl dgst -sha256 " + " ".join(shlex.quote(str(c)) for c in copies) + " > /dev/null")
    try:
        return measure(["sh", "-c", script])
    finally:
        shutil.rmtree(copy, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description="convert bf16 and gguf q8_0 against read + write + sha256")
    p.add_argument("--shape", default="70b", choices=sorted(SHAPES))
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--only", action="append", choices=sorted(COMMANDS), help="repeatable; default both")
    a = p.parse_args()
    src = checkpoint(a.shape, 1)
    infos = open_hf_tensors(src).infos()
    largest = max(i.nbytes for i in infos)
    if shutil.which("openssl") is None:
        raise SystemExit("the limit hashes with `openssl dgst -sha256` (Python's hashlib's code): install openssl")
    in_bytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    bound = 2 * largest + 2**30
    print(f"input: {src} ({in_bytes / 1e9:.2f} GB of safetensors, largest tensor {gib(largest)}); "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    OUT.mkdir(parents=True, exist_ok=True)  # measure_xquant's seconds file
    work_dir = cache_root() / f"throughput-{a.shape}"
    shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir(parents=True)
    try:
        for name in a.only or list(COMMANDS):
            out = work_dir / ("out.gguf" if name.startswith("gguf") else "out")
            args = COMMANDS[name](src, out)
            _remove(out)
            first = measure_xquant(*args)  # hashes the inputs into the cache; not counted
            out_bytes = sum(f.stat().st_size for f in _output_files(out))
            runs: list[Timed] = []
            limits: list[Run] = []
            for rep in range(a.reps):
                # Alternate who goes first: the run right after the other's gigabytes were
                # written is measurably slower here, whichever program it is.
                steps = ("limit", "xquant") if rep % 2 == 0 else ("xquant", "limit")
                for step in steps:
                    if step == "limit":
                        limits.append(_limit(src, _output_files(out), work_dir / "copy"))
                    else:
                        _remove(out)
                        runs.append(measure_xquant(*args))
                print(f"  {name} rep {rep}: limit {limits[-1].seconds:.2f} s, xquant {runs[-1].wall.seconds:.2f} s "
                      f"as a process, {runs[-1].work:.2f} s of work", flush=True)
            _remove(out)
            lim_best, lim_med = min(r.seconds for r in limits), median(r.seconds for r in limits)
            wall_best, wall_med = min(r.wall.seconds for r in runs), median(r.wall.seconds for r in runs)
            work_best, work_med = min(r.work for r in runs), median(r.work for r in runs)
            rss = max([first.wall.max_rss] + [r.wall.max_rss for r in runs])
            print(f"{name}: output {out_bytes / 1e9:.2f} GB")
            print(f"  limit (read {in_bytes / 1e9:.2f} GB + write and sha256 {out_bytes / 1e9:.2f} GB): "
                  f"best {lim_best:.2f} s, median {lim_med:.2f} s")
            print(f"  xquant, whole process: best {wall_best:.2f} s, median {wall_med:.2f} s; "
                  f"ratio to the limit best {lim_best / wall_best:.2f}, median {lim_med / wall_med:.2f}")
            print(f"  xquant, work in the process: best {work_best:.2f} s, median {work_med:.2f} s; "
                  f"ratio to the limit best {lim_best / work_best:.2f}, median {lim_med / work_med:.2f}  "
                  f"[target >= 0.5]")
            print(f"  peak RSS {gib(rss)}; bound 2 x largest + 1 GiB = {gib(bound)}  "
                  f"[{'ok' if rss <= bound else 'OVER'}]", flush=True)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
