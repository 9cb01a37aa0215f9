"""One command model: the CLI and the recipe are built from the same typed options, and one
executor enforces the output rules (--force, the work directory, failures, other filesystems)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import assert_one_line_error, run_cli
from xquant.cli import app
from xquant.commands import all_commands, artifact_kinds, get


def _cli_params(name: str) -> set[str]:
    import typer.main

    click_cmd = typer.main.get_command(app).commands[name]
    return {p.name for p in click_cmd.params}


@pytest.mark.parametrize("cmd", [c.name for c in all_commands()])
def test_cli_parameters_are_exactly_the_options_fields(cmd):
    """Every field of a command's Options is a flag, and the CLI has nothing else but the inputs
    and the executor's flags: adding an option is one edit."""
    c = get(cmd)
    fields = {s.name for s in c.options.specs() if s.cli}
    inputs = {i.name for i in c.inputs}
    flags = {"dry_run", "as_json", "force", "resume"}
    params = _cli_params(cmd)
    assert fields <= params, fields - params
    assert params - fields - inputs <= flags, params - fields - inputs


def _hash_tree(path: Path) -> dict[str, str]:
    if path.is_file():
        return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()}
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- recipe = CLI

def _recipe(tmp_path: Path, body: str) -> Path:
    r = tmp_path / "r.toml"
    r.write_text(body)
    return r


def _plan(src: Path, body: str, tmp_path: Path):
    import tomllib

    from xquant.recipe import plan_recipe

    return plan_recipe(tomllib.loads(f'[source]\npath = "{src}"\n' + body), tmp_path / "w", base_dir=tmp_path)


def test_recipe_honours_every_option_the_cli_does(tiny_model, tmp_path):
    """Options a recipe used to drop silently now reach the plan, the same as from the CLI."""
    plan = _plan(tiny_model, '''
[[artifact]]
kind = "int8"
max_shard_size = "1MB"

[[artifact]]
kind = "nf4"
skip_modules = "lm_head,model.layers.0.mlp.down_proj"
max_shard_size = "2MB"

[[artifact]]
kind = "gguf"
outtype = "q8_0"
split_max_size = "2MB"

[[artifact]]
kind = "gguf"
outtype = "q4_k_m"
calibration = "en"
save_imatrix = "saved.imatrix"
''', tmp_path)
    steps = {s.name: s for s in plan.steps}
    int8 = steps["int8"].plan()
    assert int8.max_shard_size == 10**6
    nf4 = steps["nf4"].plan(mode="dry-run")
    assert nf4.max_shard_size == 2 * 10**6
    assert not any(j.spec.name.startswith("model.layers.0.mlp.down_proj.weight.") for j in nf4.jobs)
    q8 = steps["model-q8_0.gguf"].plan()
    assert q8.split_max_size == 2 * 10**6 and len(q8.output_paths()) > 1
    q4 = steps["model-q4_k_m.gguf"].plan()
    assert q4.imatrix_out == (tmp_path / "saved.imatrix").resolve()
    # the same options, read from the CLI, give the same plan
    cli = json.loads(run_cli("gguf", tiny_model, tmp_path / "x.gguf", "--outtype", "q8_0", "--split-max-size",
                             "2MB", "--dry-run", "--json", check=True).stdout)
    assert len(cli["summary"]["output"].split(", ")) == len(q8.output_paths())


def test_recipe_delta_keeps_the_users_skip_base_check(tiny_model, tmp_path):
    plan = _plan(tiny_model, '[delta]\npath = "d"\nskip_base_check = true\n', tmp_path)
    merged = plan.steps[-1]
    assert merged.kind == "apply-delta" and merged.options.skip_base_check is True
    assert merged.inputs["delta"] == (tmp_path / "d").resolve()


@pytest.mark.parametrize("table, needles", [
    ('kind = "int8"\nbogus = 1', ["artifact 1 (int8)", "unknown key 'bogus'", "threshold", "max_shard_size"]),
    ('kind = "gguf"\noutype = "q8_0"', ["artifact 1 (gguf)", "unknown key 'outype'", "outtype"]),
    ('kind = "int8"\nthreshold = "high"', ["artifact 1 (int8)", "threshold = 'high'", "expected a number"]),
    ('kind = "gptq"\nbits = 4.5', ["artifact 1 (gptq)", "bits = 4.5", "whole number"]),
    ('kind = "gptq"\nbits = 5', ["artifact 1 (gptq)", "--bits 5"]),
    ('kind = "gguf"\nouttype = "q9_9"', ["artifact 1 (gguf)", "q9_9", "unknown GGUF type"]),
    ('kind = "nf4"\ndouble_quant = "yes"', ["artifact 1 (nf4)", "double_quant", "true or false"]),
    ('kind = "gptq"\ncalibration = 3', ["artifact 1 (gptq)", "calibration = 3"]),
    ('kind = "nosuch"', ["artifact 1", "unknown kind 'nosuch'", "gptq"]),
])
def test_recipe_bad_keys_are_one_line_before_any_step(tiny_model, tmp_path, table, needles):
    recipe = _recipe(tmp_path, f'[source]\npath = "{tiny_model}"\n\n[[artifact]]\n{table}\n')
    for extra in ([], ["--dry-run"]):
        proc = run_cli("run", recipe, "--workdir", tmp_path / "w", *extra)
        assert_one_line_error(proc, *needles)
        assert not (tmp_path / "w").exists()


def test_recipe_unknown_tables_and_report_keys(tiny_model, tmp_path):
    recipe = _recipe(tmp_path, f'[source]\npath = "{tiny_model}"\n[reprot]\neval = ["en"]\n')
    assert_one_line_error(run_cli("run", recipe, "--dry-run"), "unknown table [reprot]", "report")
    recipe = _recipe(tmp_path, f'[source]\npath = "{tiny_model}"\n[report]\nevals = ["en"]\n')
    assert_one_line_error(run_cli("run", recipe, "--dry-run"), "[report]", "unknown key 'evals'", "eval")


def test_cli_and_recipe_reject_the_same_value_with_the_same_words(tiny_model, tmp_path):
    cli = run_cli("int8", tiny_model, tmp_path / "o", "--threshold", "-1")
    assert_one_line_error(cli, "--threshold -1", "must be >= 0")
    recipe = _recipe(tmp_path, f'[source]\npath = "{tiny_model}"\n[[artifact]]\nkind = "int8"\nthreshold = -1\n')
    assert_one_line_error(run_cli("run", recipe, "--dry-run"), "--threshold -1", "must be >= 0")


def test_every_option_is_recorded_in_the_manifest(tiny_model, tmp_path):
    run_cli("int8", tiny_model, tmp_path / "o", "--max-shard-size", "3MB", check=True)
    options = json.loads((tmp_path / "o" / "xquant-manifest.json").read_text())["options"]
    assert set(get("int8").options.keys()) <= set(options)
    assert options["max_shard_size"] == "3MB"
    dry = json.loads(run_cli("int8", tiny_model, tmp_path / "p", "--dry-run", "--json", check=True).stdout)
    assert set(get("int8").options.keys()) <= set(dry["options"])


def test_manifest_options_are_the_options_as_given(tiny_model, tmp_path):
    """A manifest's `options` can be typed again: the values as given, not the planner's bytes."""
    run_cli("convert", tiny_model, tmp_path / "c", "--max-shard-size", "3MB", check=True)
    manifest = json.loads((tmp_path / "c" / "xquant-manifest.json").read_text())
    assert set(manifest["options"]) == set(get("convert").options.keys())
    assert manifest["options"]["max_shard_size"] == "3MB"
    assert manifest["resolved"]["max_shard_size"] == 3_000_000


def test_artifact_kinds_are_the_registered_commands():
    assert set(artifact_kinds()) == {"convert", "apply-delta", "int8", "nf4", "gptq", "gguf"}


# ---------------------------------------------------------------- --force and the work directory

def test_force_never_replaces_a_users_folder(tiny_model, tmp_path):
    important = tmp_path / "important"
    important.mkdir()
    (important / "thesis.tex").write_text("years of work")
    before = _hash_tree(important)
    proc = run_cli("gguf", tiny_model, important, "--outtype", "f16", "--force")
    assert_one_line_error(proc, str(important), "not written by xquant")
    assert _hash_tree(important) == before and important.is_dir()
    # a user's file, too
    notes = tmp_path / "notes.gguf"
    notes.write_text("mine")
    assert_one_line_error(run_cli("gguf", tiny_model, notes, "--force"), "not written by xquant")
    assert notes.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["important", "notes.gguf"]


def test_force_replaces_only_an_artifact_of_the_same_kind(tiny_model, tmp_path):
    out = tmp_path / "o"
    run_cli("int8", tiny_model, out, check=True)
    assert_one_line_error(run_cli("int8", tiny_model, out), "already exists", "--force")
    assert_one_line_error(run_cli("nf4", tiny_model, out, "--force"), "'int8' artifact", "same kind")
    assert json.loads((out / "xquant-manifest.json").read_text())["command"] == "int8"
    run_cli("int8", tiny_model, out, "--force", "--threshold", "5", check=True)
    assert json.loads((out / "xquant-manifest.json").read_text())["options"]["threshold"] == 5.0
    # a file the user added to an artifact is theirs: the artifact is then not replaced
    (out / "my-notes.txt").write_text("keep")
    assert_one_line_error(run_cli("int8", tiny_model, out, "--force"), "my-notes.txt", "did not write")
    assert (out / "my-notes.txt").read_text() == "keep"
    # a GGUF file made by xquant is replaced by the same command
    g = tmp_path / "m.gguf"
    run_cli("gguf", tiny_model, g, "--outtype", "f32", check=True)
    run_cli("gguf", tiny_model, g, "--outtype", "f16", "--force", check=True)
    assert json.loads((tmp_path / "m.gguf.xquant-manifest.json").read_text())["options"]["outtype"] == "f16"


def test_run_never_deletes_what_it_did_not_make(tiny_model, tmp_path):
    wd = tmp_path / "wd"
    (wd / "int8").mkdir(parents=True)
    (wd / "int8" / "notes.txt").write_text("mine")
    recipe = _recipe(tmp_path, f'[source]\npath = "{tiny_model}"\n[[artifact]]\nkind = "int8"\n')
    assert_one_line_error(run_cli("run", recipe, "--workdir", wd), str(wd / "int8"), "not written by xquant")
    assert (wd / "int8" / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in (wd / "int8").iterdir()) == ["notes.txt"]


# ---------------------------------------------------------------- failures and other filesystems

@contextlib.contextmanager
def _tmpfs(path: Path, size: str):
    """A small tmpfs of its own: another filesystem, and one that fills up."""
    path.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "xquant-test", str(path)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_output_on_another_filesystem(tiny_model, tmp_path):
    """HF -> HF without a cast copies tensor bytes in the kernel; across filesystems the kernel
    refuses (EXDEV) and the copy falls back to read/write."""
    from safetensors.torch import load_file

    with _tmpfs(tmp_path / "other", "256m") as other:
        run_cli("convert", tiny_model, other / "out", check=True)
        a = load_file(tiny_model / "model.safetensors")
        b = load_file(other / "out" / "model.safetensors")
        assert sorted(a) == sorted(b) and all((a[k] == b[k]).all() for k in a)
        manifest = json.loads((other / "out" / "xquant-manifest.json").read_text())
        got = {o["path"]: o["sha256"] for o in manifest["outputs"]}
        assert got["model.safetensors"] == hashlib.sha256((other / "out" / "model.safetensors").read_bytes()).hexdigest()
        run_cli("gguf", tiny_model, other / "m.gguf", "--outtype", "f32", check=True)
        assert (other / "m.gguf").stat().st_size > 0


@pytest.mark.parametrize("args", [["convert", "--dtype", "float16"], ["gguf", "--outtype", "f32"],
                                  ["gptq", "--samples", "4", "--seq-len", "64"]])
def test_a_full_disk_leaves_nothing(tiny_model, tmp_path, args):
    with _tmpfs(tmp_path / "small", "600k") as small:
        out = small / ("o.gguf" if args[0] == "gguf" else "o")
        proc = run_cli(args[0], tiny_model, out, *args[1:])
        assert_one_line_error(proc, "disk full")
        assert list(small.iterdir()) == [], list(small.iterdir())


def test_a_gptq_failure_leaves_no_resume_state(tiny_model, tmp_path):
    """A run that fails (not interrupted) removes its resume state; a refused one never makes it."""
    model = tmp_path / "m"
    shutil.copytree(tiny_model, model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["hidden_act"] = "no-such-activation"  # accepted by the planner, fails in the first layer
    (model / "config.json").write_text(json.dumps(cfg))
    proc = run_cli("gptq", model, tmp_path / "o", "--samples", "4", "--seq-len", "64")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_demo_dry_run_prints_the_plan_and_writes_nothing(tmp_path):
    proc = run_cli("demo", "--workdir", tmp_path / "demo", "--dry-run", "--json", check=True)
    plan = json.loads(proc.stdout)
    steps = [s["step"] for s in plan["steps"]]
    assert steps[:2] == ["hf", "merged"] and "gptq-4bit-g128" in steps and "model-q4_k_m.gguf" in steps
    assert all(s["size"] != "?" and s["peak memory"] != "?" for s in plan["steps"]), plan["steps"]
    assert "peak memory" in plan["summary"]
    assert not (tmp_path / "demo").exists()
