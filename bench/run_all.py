"""Run every benchmark in turn (make bench)."""

import runpy
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
for name in sorted(p.stem for p in HERE.glob("*.py") if p.stem not in ("common", "run_all")):
    print(f"===== {name}")
    runpy.run_path(str(HERE / f"{name}.py"), run_name="__main__")
