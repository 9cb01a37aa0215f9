"""Run one xquant command inside this process and record how long its work took.

    python bench/inproc.py SECONDS_FILE COMMAND ARGS...

Python, torch and xquant are imported before the clock starts, so the figure written to
SECONDS_FILE is the command's own work (plan, read, transform, write, hash, rename): the
throughput of the IO layer, which is what a long conversion runs at. The start-up it leaves out
(~1.3 s here, mostly `import torch`) is paid once per command whatever the model's size.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402,F401  (start-up, outside the clock)

import xquant.convert  # noqa: E402,F401
import xquant.delta  # noqa: E402,F401
import xquant.pipeline  # noqa: E402,F401
from xquant import cli  # noqa: E402


def main() -> None:
    seconds_file, args = Path(sys.argv[1]), sys.argv[2:]
    t0 = time.perf_counter()
    try:
        cli.app(args)
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    seconds_file.write_text(f"{time.perf_counter() - t0:.6f}\n")
    cli.exit_now(0)  # as the console script ends

if __name__ == "__main__":
    main()
