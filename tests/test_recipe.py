"""`xquant run`: a recipe planned, run, interrupted and resumed to the same files."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import assert_one_line_error, run_cli
from helpers import kill_after_gptq_layer

RECIPE = """
[source]
path = "{src}"
dtype = "float16"

[[artifact]]
kind = "int8"

[[artifact]]
kind = "gptq"
bits = 4
group_size = 128
samples = 8
seq_len = 128

[[artifact]]
kind = "nf4"

[[artifact]]
kind = "gguf"
outtype = "q8_0"
"""
STEPS = ["hf", "int8", "gptq-4bit-g128", "nf4", "model-q8_0.gguf"]


def _artifact_files(workdir: Path) -> dict[str, bytes]:
    """Every artifact file except manifests and step records (which hold times)."""
    return {p.relative_to(workdir).as_posix(): p.read_bytes() for p in sorted(workdir.rglob("*"))
            if p.is_file() and "manifest" not in p.name and not p.name.startswith(".xquant-step")}


def _statuses(recipe: Path, workdir: Path) -> dict[str, str]:
    plan = json.loads(run_cli("run", recipe, "--workdir", workdir, "--dry-run", "--json", check=True).stdout)
    return {s["step"]: s["status"] for s in plan["steps"]}


def test_dry_run_lists_steps(tiny_model, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(RECIPE.format(src=tiny_model))
    plan = json.loads(run_cli("run", recipe, "--workdir", tmp_path / "w", "--dry-run", "--json", check=True).stdout)
    assert [s["step"] for s in plan["steps"]] == STEPS
    assert all(s["status"] == "to do" for s in plan["steps"]) and not (tmp_path / "w").exists()
    # every step estimated, the later ones on a stand-in for the converted checkpoint
    assert all(s["size"] != "?" and s["peak memory"] != "?" for s in plan["steps"]), plan["steps"]
    assert "GiB" in plan["summary"]["peak memory"] or "MiB" in plan["summary"]["peak memory"]
    assert "stand-in" in plan["summary"]["note"] and "of outputs" in plan["summary"]["disk estimate"]


_UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}


def _bytes(text: str) -> float:
    number, unit = text.split()
    return float(number) * _UNITS[unit]


def _size(path: Path) -> int:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files if "manifest" not in p.name)


def test_interrupted_run_resumes_to_the_same_files(tiny_model, tmp_path):
    """SIGKILL while GPTQ is quantizing (its first layer committed to the resume state, the rest
    not), then the same command again: the chain continues and ends with the very bytes of an
    uninterrupted run; in between, nothing unfinished looks like a finished artifact."""
    recipe = tmp_path / "r.toml"
    recipe.write_text(RECIPE.format(src=tiny_model))
    whole = tmp_path / "whole"
    estimated = json.loads(run_cli("run", recipe, "--workdir", whole, "--dry-run", "--json", check=True).stdout)
    run_cli("run", recipe, "--workdir", whole, check=True)
    for s in estimated["steps"]:  # the dry run's sizes, planned before any input existed, hold
        actual = _size(Path(s["to"]))
        assert abs(_bytes(s["size"]) - actual) <= 0.1 * actual + 2**16, (s["step"], s["size"], actual)

    cut = tmp_path / "cut"
    gptq_out = cut / "gptq-4bit-g128"
    done = kill_after_gptq_layer(["run", recipe, "--workdir", cut], gptq_out, layer=0)  # a crash inside GPTQ
    assert not gptq_out.exists() and not (cut / ".xquant-step-gptq-4bit-g128.json").exists()
    finished = sorted(p.name for p in cut.iterdir() if not p.name.startswith("."))
    assert finished == ["hf-float16", "int8"], finished  # only whole artifacts under real names
    assert all((cut / name / "xquant-manifest.json").exists() for name in finished)
    assert _statuses(recipe, cut) == {"hf": "done", "int8": "done", "gptq-4bit-g128": "to do",
                                      "nf4": "to do", "model-q8_0.gguf": "to do"}

    run_cli("run", recipe, "--workdir", cut, check=True)
    assert _artifact_files(cut) == _artifact_files(whole)
    resumed = json.loads((gptq_out / "xquant-manifest.json").read_text())["gptq"]["resumed_at_layer"]
    # killed after layer `done` was committed: the GPTQ step continued from the next one
    assert resumed == done + 1 and 1 <= resumed < 4, (resumed, done)
    leftovers = [p.name for p in cut.iterdir() if p.name.startswith(".") and not p.name.startswith(".xquant-step")]
    assert not leftovers, leftovers
    assert set(_statuses(recipe, cut).values()) == {"done"}


def test_bad_recipes(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[source\npath = 1")
    assert_one_line_error(run_cli("run", bad), "bad.toml", "not valid TOML")
    bad.write_text('[source]\npath = "x"\n[[artifact]]\nkind = "onnx"\n')
    assert_one_line_error(run_cli("run", bad, "--workdir", tmp_path / "w"), "unknown kind 'onnx'", "int8")
