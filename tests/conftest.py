"""Session fixtures: tiny real models built once (and cached across runs), plus CLI helpers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("XQUANT_QUIET", "1")
# Tests share the tiny-model cache with the demo unless told otherwise.
REPO = Path(__file__).resolve().parent.parent

# Figures worth seeing in the test log (perplexities, sizes); printed once at the end of the run.
FIGURES: list[str] = []


def report(line: str) -> None:
    """Record a figure for the end-of-run summary (pytest captures ordinary prints)."""
    FIGURES.append(line)


def pytest_terminal_summary(terminalreporter):
    if FIGURES:
        terminalreporter.section("xquant figures")
        for line in FIGURES:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """The tiny trained LlamaForCausalLM (fp32), built once per cache."""
    from xquant.demo import tiny

    path = tiny.model_dir()
    ppl = tiny.eval_perplexity(path)
    report(f"tiny model {path.name}: held-out perplexity (mixed eval) {ppl:.2f}; uniform would be {tiny.SPEC.vocab_size}")
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer() -> Path:
    from xquant.demo import tiny

    return tiny.tokenizer_dir()


def run_cli(*args: str, env: dict | None = None, check: bool = False) -> subprocess.CompletedProcess:
    """Run `xquant ...` in a subprocess, as a user would."""
    full_env = {**os.environ, "XQUANT_QUIET": "1", **(env or {})}
    full_env.pop("XQUANT_DEBUG", None) if not (env and "XQUANT_DEBUG" in env) else None
    proc = subprocess.run([sys.executable, "-m", "xquant.cli", *map(str, args)], capture_output=True,
                          text=True, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"xquant {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """A user-facing failure: non-zero exit, one line on stderr naming what is wrong, no traceback."""
    assert proc.returncode != 0, proc.stdout
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture(scope="session")
def tiny_derivative() -> Path:
    """The tiny model's "derivative" (float16, vocabulary 2000 -> 2256, trained further), built once.

    Its base is the tiny model converted to float16 (the Ziya situation in miniature).
    """
    import json

    from xquant.demo.derivative import derivative_dir

    path = derivative_dir()
    built = json.loads((path / "xquant-tiny.json").read_text())
    report(f"tiny derivative {path.name}: vocabulary {built['vocab'][0]} -> {built['vocab'][1]}, "
           f"{built['spec']['steps']} training steps in {built['train_seconds']} s")
    return path


@pytest.fixture(scope="session")
def moe() -> Path:
    """The tiny trained mixture of experts (`Qwen2MoeForCausalLM`, fixtures_moe.py), built once per cache."""
    import fixtures_moe

    return fixtures_moe.moe_dir()


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a test module (`pytestmark = pytest.mark.usefixtures(...)`):
    bitwise-comparable with the one-thread subprocesses, and faster on a busy 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
