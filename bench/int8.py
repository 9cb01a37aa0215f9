"""LLM.int8 benchmark: `xquant int8` against the transformers route on a ≥ 2 GB synthetic LLaMA.

The transformers route is what the issue's XuanYuan-70B-8bit was made with: from_pretrained with
BitsAndBytesConfig(load_in_8bit=True) on CPU, then save_pretrained. Both run as child processes on
the same float16 checkpoint (warm page cache for both); printed: wall time and peak RSS of each,
their ratios, xquant's dry-run memory estimate, and whether the two artifacts hold identical tensors.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

from common import OUT, dir_bytes, gib, measure, synthetic_llama, xquant_cmd

TRANSFORMERS_ROUTE = """
import sys, torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
from transformers.utils import logging
logging.disable_progress_bar()
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], device_map="cpu",
                                             quantization_config=BitsAndBytesConfig(load_in_8bit=True))
model.save_pretrained(sys.argv[2])
"""


def same_tensors(a, b) -> tuple[bool, int]:
    """Compare two artifacts tensor by tensor (one pair in memory at a time)."""
    import torch

    from xquant.io.readers import open_hf_tensors

    ra, rb = open_hf_tensors(a), open_hf_tensors(b)
    if sorted(ra.names()) != sorted(rb.names()):
        return False, 0
    for name in ra.names():
        x, y = ra.get(name), rb.get(name)
        if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x, y):
            print(f"  differs: {name}")
            return False, len(ra)
    return True, len(ra)


def main() -> None:
    src = synthetic_llama(OUT / "llama-1b-fp16")
    print(f"input: {src} ({gib(dir_bytes(src))}, float16, 22 layers)")
    ours, theirs = OUT / "int8-xquant", OUT / "int8-transformers"
    plan = json.loads(subprocess.run(xquant_cmd("int8", src, ours, "--dry-run", "--json"), check=True,
                                     capture_output=True, text=True).stdout)
    for path in (ours, theirs):
        shutil.rmtree(path, ignore_errors=True)
    subprocess.run(["sync"])
    xq = measure(xquant_cmd("int8", src, ours, "--max-shard-size", "5GB"))
    subprocess.run(["sync"])
    tf = measure([sys.executable, "-c", TRANSFORMERS_ROUTE, str(src), str(theirs)],
                 env={"TRANSFORMERS_VERBOSITY": "error"})
    print(f"xquant int8:       {xq.seconds:7.1f} s, peak RSS {gib(xq.max_rss)} "
          f"(dry-run estimate {plan['summary']['estimated peak memory']}); output {gib(dir_bytes(ours))}")
    print(f"transformers+bnb:  {tf.seconds:7.1f} s, peak RSS {gib(tf.max_rss)}; output {gib(dir_bytes(theirs))}")
    print(f"time ratio (xquant / transformers): {xq.seconds / tf.seconds:.2f}")
    print(f"peak RSS ratio (xquant / transformers): {xq.max_rss / tf.max_rss:.2f}")
    identical, count = same_tensors(ours, theirs)
    print(f"tensors identical to the transformers route: {identical} ({count} tensors)")
    shutil.rmtree(ours, ignore_errors=True)
    shutil.rmtree(theirs, ignore_errors=True)


if __name__ == "__main__":
    main()
