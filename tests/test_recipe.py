"""`xquant run`: a recipe planned, run, interrupted and resumed to the same files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import assert_one_line_error, run_cli

RECIPE = """
[source]
path = "{src}"
dtype = "float16"

[[artifact]]
kind = "int8"

[[artifact]]
kind = "nf4"

[[artifact]]
kind = "gguf"
outtype = "q8_0"
"""


def _artifact_files(workdir: Path) -> dict[str, bytes]:
    """Every artifact file except manifests and step records (which hold times)."""
    return {p.relative_to(workdir).as_posix(): p.read_bytes() for p in sorted(workdir.rglob("*"))
            if p.is_file() and "manifest" not in p.name and not p.name.startswith(".xquant-step")}


def test_dry_run_lists_steps(tiny_model, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(RECIPE.format(src=tiny_model))
    plan = json.loads(run_cli("run", recipe, "--workdir", tmp_path / "w", "--dry-run", "--json", check=True).stdout)
    assert [s["step"] for s in plan["steps"]] == ["hf", "int8", "nf4", "model-q8_0.gguf"]
    assert all(s["status"] == "to do" for s in plan["steps"]) and not (tmp_path / "w").exists()


def test_interrupted_run_resumes_to_the_same_files(tiny_model, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(RECIPE.format(src=tiny_model))
    whole = tmp_path / "whole"
    run_cli("run", recipe, "--workdir", whole, check=True)

    cut = tmp_path / "cut"
    env = {**os.environ, "XQUANT_QUIET": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "xquant.cli", "run", str(recipe), "--workdir", str(cut)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (cut / ".xquant-step-int8.json").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # a crash in the middle of the nf4 step, no clean-up
    proc.wait()
    assert (cut / "int8").exists() and not (cut / "model-q8_0.gguf").exists()
    run_cli("run", recipe, "--workdir", cut, check=True)
    assert _artifact_files(cut) == _artifact_files(whole)
    plan = json.loads(run_cli("run", recipe, "--workdir", cut, "--dry-run", "--json", check=True).stdout)
    assert all(s["status"] == "done" for s in plan["steps"])


def test_bad_recipes(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[source\npath = 1")
    assert_one_line_error(run_cli("run", bad), "bad.toml", "not valid TOML")
    bad.write_text('[source]\npath = "x"\n[[artifact]]\nkind = "onnx"\n')
    assert_one_line_error(run_cli("run", bad, "--workdir", tmp_path / "w"), "unknown kind 'onnx'", "int8")
