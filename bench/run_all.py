"""Run every benchmark in turn (make bench)."""

import runpy
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
# shapes.py is a library (the real-shaped checkpoints); gptq_shapes.py and commands_at_shape.py take
# 10-40 minutes on 2 cores even at 7B widths, so they are run by hand (see their docstrings).
NOT_HERE = ("common", "run_all", "shapes", "gptq_shapes", "commands_at_shape", "throughput")
for name in sorted(p.stem for p in HERE.glob("*.py") if p.stem not in NOT_HERE):
    print(f"===== {name}")
    runpy.run_path(str(HERE / f"{name}.py"), run_name="__main__")
