"""IO benchmark: copy a ≥ 2 GB synthetic checkpoint through xquant's reader and writer.

Prints throughput as a ratio to `cp` of the same files (measured in the same run, warm page
cache for both) and peak RSS as a ratio to the largest tensor. xquant is timed twice in each run:
its work inside the process (the IO layer's throughput, what a 130 GB conversion runs at) and the
whole process (adding the ~1.3 s of Python and torch start-up that any command pays once).
Targets (issue 2): throughput ≥ 0.5 × cp; peak RSS ≤ 2 × largest tensor + 1 GiB.
"""

from __future__ import annotations

import shutil
import subprocess

from common import OUT, Run, Timed, dir_bytes, gib, measure, measure_xquant, print_against_cp, synthetic_llama

from xquant.io.readers import open_hf_tensors


REPS = 6  # this VM's page-cache timings vary up to 8x between runs: best and median of several


def main() -> None:
    src = synthetic_llama(OUT / "llama-1b-fp16")
    size = dir_bytes(src)
    largest = max(i.nbytes for i in open_hf_tensors(src).infos())
    print(f"input: {src} ({gib(size)}), largest tensor {gib(largest)}")
    cp_dst, xq_dst = OUT / "io-cp", OUT / "io-xquant"
    cp_runs: list[Run] = []
    xq_runs: list[Timed] = []
    def run_cp() -> None:
        shutil.rmtree(cp_dst, ignore_errors=True)
        subprocess.run(["sync"])
        cp_runs.append(measure(["cp", "-r", str(src), str(cp_dst)]))

    def run_xquant() -> None:
        shutil.rmtree(xq_dst, ignore_errors=True)
        subprocess.run(["sync"])
        xq_runs.append(measure_xquant("convert", src, xq_dst, "--max-shard-size", "1200MB"))

    for rep in range(REPS):
        # Alternate who goes first: on this VM the run right after the other's 2 GB were
        # flushed is measurably slower, whichever program it is.
        for run in ((run_cp, run_xquant) if rep % 2 == 0 else (run_xquant, run_cp)):
            run()
        print(f"  rep {rep}: cp {cp_runs[-1].seconds:.2f} s; xquant convert {xq_runs[-1].wall.seconds:.2f} s "
              f"as a process, {xq_runs[-1].work:.2f} s of work"
              + (" (rep 0 includes hashing the inputs once; later reps use the hash cache)" if rep == 0 else ""))
    print_against_cp("xquant convert", size, cp_runs, xq_runs, largest)
    shutil.rmtree(cp_dst, ignore_errors=True)
    shutil.rmtree(xq_dst, ignore_errors=True)

if __name__ == "__main__":
    main()
