"""The CLI on real files: inspect, HF->HF convert (re-shard, cast, .bin -> safetensors), bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from conftest import assert_one_line_error, run_cli
from helpers import write_safetensors
from xquant.io.hashing import sha256_file
from xquant.io.output import MANIFEST_NAME
from xquant.io.readers import open_hf_tensors


def _logits(path: Path, dtype=torch.float32) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    ids = torch.tensor([[1, 15, 200, 7, 999, 42, 3, 1500]])
    with torch.inference_mode():
        return model(ids).logits.float()


def test_version_and_help():
    proc = run_cli("--version", check=True)
    assert proc.stdout.startswith("xquant ")
    helptext = run_cli("--help", check=True).stdout
    for command in ("inspect", "convert", "demo"):
        assert command in helptext


def test_inspect_hf_json(tiny_model):
    info = json.loads(run_cli("inspect", tiny_model, "--json", "--tensors", check=True).stdout)
    assert info["architecture"] == "LlamaForCausalLM" and info["xquant_arch"] == "llama"
    assert info["layers"] == 4 and info["heads"] == 8 and info["kv_heads"] == 2
    assert info["vocab_size"] == 2000 and info["dtypes"] == {"float32": info["tensor_count"]}
    assert info["parameters"] == sum(r["bytes"] for r in info["tensors"]) // 4
    assert info["quantization"] is None
    table = run_cli("inspect", tiny_model, check=True).stdout
    assert "LlamaForCausalLM" in table and "parameters" in table


def test_convert_reshard_fp32_is_exact(tiny_model, tmp_path):
    out = tmp_path / "resharded"
    run_cli("convert", tiny_model, out, "--max-shard-size", "3MB", check=True)
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 3 and (out / "model.safetensors.index.json").exists()
    src, dst = open_hf_tensors(tiny_model), open_hf_tensors(out)
    assert src.names() and set(src.names()) == set(dst.names())
    for name in src.names():
        assert torch.equal(src.get(name), dst.get(name)), name
    assert torch.equal(_logits(tiny_model), _logits(out))
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["command"] == "convert" and manifest["xquant_version"]
    for rec in manifest["outputs"]:
        assert rec["sha256"] == sha256_file(out / rec["path"])
    by_name = {Path(r["path"]).name: r["sha256"] for r in manifest["inputs"]}
    assert by_name["model.safetensors"] == sha256_file(tiny_model / "model.safetensors")
    assert (out / "tokenizer.model").read_bytes() == (tiny_model / "tokenizer.model").read_bytes()


def test_convert_to_fp16_and_from_legacy_bin(tiny_model, tmp_path):
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    shutil.copy(tiny_model / "config.json", legacy)
    state = {n: open_hf_tensors(tiny_model).get(n) for n in open_hf_tensors(tiny_model).names()}
    torch.save(state, legacy / "pytorch_model.bin")
    out = tmp_path / "fp16"
    run_cli("convert", legacy, out, "--dtype", "float16", check=True)
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "float16"
    got = open_hf_tensors(out)
    for name, t in state.items():
        assert got.info(name).dtype == torch.float16
        assert torch.equal(got.get(name), t.half()), name
    ref = _logits(tiny_model)
    half = _logits(out, torch.float32)  # fp16 weights, computed in fp32
    assert (ref - half).abs().max() < 0.05


def test_dry_run_writes_nothing(tiny_model, tmp_path):
    out = tmp_path / "planned"
    proc = run_cli("convert", tiny_model, out, "--dtype", "bfloat16", "--dry-run", "--json", check=True)
    plan = json.loads(proc.stdout)
    assert plan["summary"]["tensors"] == len(open_hf_tensors(tiny_model).names())
    assert all(row["dtype"] == "bfloat16" for row in plan["tensors"])
    assert "estimated peak memory" in plan["summary"]
    assert not out.exists() and list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- bad input

def _no_leftovers(parent: Path, allowed: set[str]) -> None:
    assert {p.name for p in parent.iterdir()} <= allowed


def test_missing_directory(tmp_path):
    assert_one_line_error(run_cli("inspect", tmp_path / "nope"), "nope", "no such file")
    assert_one_line_error(run_cli("convert", tmp_path / "nope", tmp_path / "out"), "no such file")
    _no_leftovers(tmp_path, set())


def test_directory_without_weights(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    assert_one_line_error(run_cli("convert", tmp_path / "m", tmp_path / "out"), "no weights found")
    _no_leftovers(tmp_path, {"m"})


def test_truncated_and_missing_shards(tiny_model, tmp_path):
    m = tmp_path / "m"
    run_cli("convert", tiny_model, m, "--max-shard-size", "3MB", check=True)
    shard = sorted(m.glob("model-*.safetensors"))[2]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    assert_one_line_error(run_cli("convert", m, tmp_path / "out"), shard.name, "truncated")
    assert_one_line_error(run_cli("inspect", m), shard.name, "truncated")
    shard.unlink()
    assert_one_line_error(run_cli("convert", m, tmp_path / "out"), shard.name, "missing")
    _no_leftovers(tmp_path, {"m"})


def test_pickle_with_code_refused_via_cli(tmp_path):
    import os

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    meta = tmp_path / "meta"
    meta.mkdir()
    (meta / "params.json").write_text(json.dumps({"dim": 8, "n_layers": 1, "n_heads": 2}))
    torch.save({"tok_embeddings.weight": torch.zeros(4, 8), "evil": Evil()}, meta / "consolidated.00.pth")
    assert_one_line_error(run_cli("inspect", meta), "consolidated.00.pth", "refused")
    assert not (tmp_path / "pwned").exists()


def test_output_inside_input_and_existing_output(tiny_model, tmp_path):
    m = tmp_path / "m"
    write_safetensors(m.mkdir() or m, {"model.embed_tokens.weight": torch.zeros(4, 4)})
    (m / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 0}))
    before = sorted(p.name for p in m.iterdir())
    assert_one_line_error(run_cli("convert", m, m / "inner"), "inside the input")
    assert_one_line_error(run_cli("convert", m, m), "is the input")
    assert sorted(p.name for p in m.iterdir()) == before
    (tmp_path / "exists").mkdir()
    assert_one_line_error(run_cli("convert", m, tmp_path / "exists"), "already exists", "--force")
    # --force replaces only an artifact xquant made with the same command, never a user's folder
    assert_one_line_error(run_cli("convert", m, tmp_path / "exists", "--force"), "not written by xquant")
    run_cli("convert", m, tmp_path / "made", check=True)
    run_cli("convert", m, tmp_path / "made", "--force", "--dtype", "float16", check=True)
    assert (tmp_path / "made" / "model.safetensors").exists()
    assert json.loads((tmp_path / "made" / "xquant-manifest.json").read_text())["options"]["dtype"] == "float16"


def test_unsupported_architecture_lists_known(tmp_path):
    m = tmp_path / "m"
    m.mkdir()
    write_safetensors(m, {"w": torch.zeros(2)})
    (m / "config.json").write_text(json.dumps({"architectures": ["GPTNeoXForCausalLM"]}))
    assert_one_line_error(run_cli("convert", m, tmp_path / "out"), "GPTNeoXForCausalLM", "LlamaForCausalLM")


def test_debug_shows_traceback(tmp_path):
    proc = run_cli("inspect", tmp_path / "nope", env={"XQUANT_DEBUG": "1"})
    assert proc.returncode != 0 and "Traceback" in proc.stderr
