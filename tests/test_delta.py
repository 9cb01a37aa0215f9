"""apply-delta / make-delta on the tiny derivative (expanded vocabulary, float16, the Ziya situation).

The base is the tiny model converted to float16 (as LLaMA is published); the target is the tiny
derivative. A float32 delta of two float16 models reproduces the target bit for bit, in both
styles; every bad input fails with one line and leaves nothing behind.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import assert_one_line_error, report, run_cli
from helpers import copy_model, hf_logits, no_leftovers
from xquant.delta import execute, plan_apply_delta, plan_make_delta
from xquant.errors import InputError
from xquant.io.output import MANIFEST_NAME
from xquant.io.readers import open_hf_tensors

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
IDS = [1, 15, 200, 7, 1999, 2000, 2100, 2255, 42, 3]  # old and new tokens


# ---------------------------------------------------------------- fixtures and helpers

@pytest.fixture(scope="module")
def base16(tiny_model, tmp_path_factory) -> Path:
    """The tiny model in float16, sharded differently from the delta (3 MB shards)."""
    from xquant.convert import plan_convert
    from xquant.pipeline import execute as run

    out = tmp_path_factory.mktemp("delta") / "base16"
    run(plan_convert(tiny_model, out, "float16", "3MB"))
    assert len(list(out.glob("model-*.safetensors"))) > 2
    return out


@pytest.fixture(scope="module")
def delta_fc(base16, tiny_derivative) -> Path:
    """A FastChat-style float32 delta made through the CLI (2 MB shards)."""
    out = base16.parent / "delta-fastchat"
    run_cli("make-delta", "--base", base16, "--target", tiny_derivative, "--out", out,
            "--max-shard-size", "2MB", check=True)
    return out


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    reader = open_hf_tensors(path)
    return {n: reader.get(n) for n in reader.names()}


def _tokenizer(name: str) -> bool:
    """copy_model's `keep` here: the tokenizer files (no manifest, no delta record)."""
    return name.startswith("tokenizer")


def _tokenizer_and_record(name: str) -> bool:
    return _tokenizer(name) or name == "xquant-delta.json"


# ---------------------------------------------------------------- round trips

def test_fastchat_round_trip_is_bit_exact(base16, delta_fc, tiny_derivative, tmp_path):
    target, base, delta = _tensors(tiny_derivative), _tensors(base16), _tensors(delta_fc)
    record = json.loads((delta_fc / "xquant-delta.json").read_text())
    assert record["style"] == "fastchat" and record["round_trip"]["exact"] is True
    assert set(record["base_tensors"]) == set(base)
    # FastChat semantics: overlapping rows are differences, the new vocabulary rows are the target's.
    for name in (EMBED, HEAD):
        assert delta[name].dtype == torch.float32 and delta[name].shape == (2256, 256)
        assert torch.equal(delta[name][:2000], target[name][:2000].float() - base[name].float())
        assert torch.equal(delta[name][2000:], target[name][2000:].float())
    assert json.loads((delta_fc / "config.json").read_text()) == json.loads((tiny_derivative / "config.json").read_text())

    out32 = tmp_path / "out32"
    run_cli("apply-delta", "--base", base16, "--delta", delta_fc, "--out", out32, "--dtype", "float32", check=True)
    got = _tensors(out32)
    assert set(got) == set(target)
    for name, t in target.items():
        assert got[name].dtype == torch.float32 and torch.equal(got[name], t.float()), name
    config = json.loads((out32 / "config.json").read_text())
    assert config["dtype"] == "float32" and config["vocab_size"] == 2256
    assert torch.equal(hf_logits(out32, IDS), hf_logits(tiny_derivative, IDS))

    out16 = tmp_path / "out16"  # default dtype: the one the delta's config declares (the target's)
    execute(plan_apply_delta(base16, delta_fc, out16))
    bits_differ = 0
    for name, t in _tensors(out16).items():
        assert t.dtype == torch.float16 and torch.equal(t, target[name]), name
        bits_differ += int((t.view(torch.int16) != target[name].view(torch.int16)).sum())
    # Bit for bit, except a target -0.0 that comes back +0.0 (x + -x = +0): counted by make-delta.
    assert bits_differ == record["round_trip"]["signed_zero_elements"]
    report(f"delta: fp16 -> fp32 delta -> fp16 reproduces all {record['round_trip']['elements']:,} values; "
           f"{bits_differ} negative zeros come back as +0.0")
    manifest = json.loads((out16 / MANIFEST_NAME).read_text())
    assert manifest["command"] == "apply-delta" and manifest["options"]["style"] == "fastchat"


def test_tokenizer_round_trips_eval_texts(base16, delta_fc, tiny_derivative, tmp_path):
    from xquant.demo import tiny
    from xquant.calib import load_set

    out = tmp_path / "out"
    execute(plan_apply_delta(base16, delta_fc, out))
    for f in tiny_derivative.iterdir():
        if f.name.startswith("tokenizer"):
            assert (out / f.name).read_bytes() == f.read_bytes(), f.name
    tok = tiny.load_tokenizer(out)
    assert len(tok) == 2256
    new_ids = 0
    for doc in load_set("mixed", "eval").documents:
        ids = tok(doc)["input_ids"]
        new_ids += sum(i >= 2000 for i in ids)
        assert tok.decode(ids, skip_special_tokens=True) == doc
    assert new_ids > 100  # the appended Chinese pieces are really used
    report(f"delta: expanded tokenizer uses {new_ids} new-token ids on the mixed eval texts, all round-trip")


def test_ziya_style_round_trip_and_published_delta(base16, tiny_derivative, tmp_path):
    delta = tmp_path / "delta-ziya"
    execute(plan_make_delta(base16, tiny_derivative, delta, style="ziya"))
    target, stored = _tensors(tiny_derivative), _tensors(delta)
    for name in (EMBED, HEAD):  # stored whole, as Fengshenbang's make_delta does
        assert torch.equal(stored[name], target[name].float())
    out = tmp_path / "out"
    execute(plan_apply_delta(base16, delta, out))  # style read from xquant-delta.json
    for name, t in _tensors(out).items():
        assert torch.equal(t, target[name]), name
    out32 = tmp_path / "out32"  # float32: the whole-stored tensors are copied file to file
    plan = plan_apply_delta(base16, delta, out32, dtype="float32")
    assert {j.spec.name for j in plan.jobs if j.passthrough} == {EMBED, HEAD}
    execute(plan)
    for name, t in _tensors(out32).items():
        assert torch.equal(t, target[name].float()), name

    # A delta published by Fengshenbang's tools has no xquant-delta.json: --style ziya says how to read it.
    published = copy_model(delta, tmp_path / "published", keep=_tokenizer)
    run_cli("apply-delta", "--base", base16, "--delta", published, "--out", tmp_path / "out2", "--style", "ziya",
            check=True)
    for name, t in _tensors(tmp_path / "out2").items():
        assert torch.equal(t, target[name]), name
    # Read as FastChat would, the whole-stored embedding would be added to the base's: refused.
    proc = run_cli("apply-delta", "--base", base16, "--delta", published, "--out", tmp_path / "out3")
    assert_one_line_error(proc, EMBED, "--style ziya")
    no_leftovers(tmp_path, {"delta-ziya", "out", "out32", "published", "out2"})


def test_float16_delta_matches_its_recorded_round_trip(base16, tiny_derivative, tmp_path):
    """A float16 delta (what the public tools publish) is not exact; the record says by how much."""
    delta = tmp_path / "delta16"
    execute(plan_make_delta(base16, tiny_derivative, delta, dtype="float16"))
    trip = json.loads((delta / "xquant-delta.json").read_text())["round_trip"]
    assert trip["exact"] is False and 0 < trip["inexact_elements"] < trip["elements"] // 10
    out = tmp_path / "out"
    execute(plan_apply_delta(base16, delta, out))
    target = _tensors(tiny_derivative)
    got = _tensors(out)
    differ = sum(int((got[n] != t).sum()) for n, t in target.items())
    worst = max(float((got[n].float() - t.float()).abs().max()) for n, t in target.items())
    assert differ == trip["inexact_elements"] and worst == trip["max_abs_error"]
    report(f"delta: a float16 delta misses {differ:,} of {trip['elements']:,} values (max abs error {worst:.2g}); "
           f"the float32 delta none")


def test_legacy_bin_base_with_rotary_buffers(base16, delta_fc, tiny_derivative, tmp_path):
    """A 2023-style base: two pytorch_model-*.bin shards with an index and rotary inv_freq buffers."""
    legacy = tmp_path / "legacy-base"
    legacy.mkdir()
    tensors = _tensors(base16)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, 32, 2).float() / 32))
    for i in range(4):
        tensors[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = inv_freq
    names = list(tensors)
    weight_map = {}
    for k, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        file = f"pytorch_model-0000{k + 1}-of-00002.bin"
        torch.save({n: tensors[n] for n in part}, legacy / file)
        weight_map.update({n: file for n in part})
    (legacy / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    shutil.copy(base16 / "config.json", legacy / "config.json")
    delta = copy_model(delta_fc, tmp_path / "delta", edit=lambda t: t.update(
        {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": inv_freq for i in range(4)}), keep=_tokenizer_and_record)
    out = tmp_path / "out"
    execute(plan_apply_delta(legacy, delta, out))
    got, target = _tensors(out), _tensors(tiny_derivative)
    assert set(got) == set(target)  # the buffers are recomputed by transformers: left out
    for name, t in target.items():
        assert torch.equal(got[name], t), name


def test_dry_run_writes_nothing(base16, delta_fc, tmp_path):
    out = tmp_path / "planned"
    plan = json.loads(run_cli("apply-delta", "--base", base16, "--delta", delta_fc, "--out", out,
                              "--dry-run", "--json", check=True).stdout)
    assert plan["summary"]["tensors"] == 39 and "estimated peak memory" in plan["summary"]
    rows = {r["tensor"]: r for r in plan["tensors"]}
    assert rows[EMBED]["shape"] == "2256x256" and "2000-2255 as they are" in rows[EMBED]["from"]
    assert all(r["dtype"] == "float16" for r in rows.values())
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_expect_sha256(base16, delta_fc, tmp_path):
    first = tmp_path / "first"
    execute(plan_apply_delta(base16, delta_fc, first))
    outputs = json.loads((first / MANIFEST_NAME).read_text())["outputs"]
    sums = tmp_path / "SHA256SUMS"
    sums.write_text("".join(f"{r['sha256']}  ziya/{r['path']}\n" for r in outputs))
    execute(plan_apply_delta(base16, delta_fc, tmp_path / "second", expect_sha256=sums))
    as_json = tmp_path / "sums.json"
    as_json.write_text(json.dumps({r["path"]: r["sha256"] for r in outputs if r["path"] == "model.safetensors"}))
    execute(plan_apply_delta(base16, delta_fc, tmp_path / "third", expect_sha256=as_json))
    bin_sums = tmp_path / "bin.sha256"  # published hashes of .bin files cannot describe a safetensors result
    bin_sums.write_text(f"{'1' * 64}  pytorch_model-00001-of-00003.bin\n")
    with pytest.raises(InputError, match="pytorch_model-00001-of-00003.bin.*will not contain"):
        plan_apply_delta(base16, delta_fc, tmp_path / "fifth", expect_sha256=bin_sums)

    bad = tmp_path / "bad.sha256"
    bad.write_text(f"{'0' * 64}  model.safetensors\n")
    proc = run_cli("apply-delta", "--base", base16, "--delta", delta_fc, "--out", tmp_path / "fourth",
                   "--expect-sha256", bad)
    assert_one_line_error(proc, "model.safetensors", "differs", "bad.sha256")
    no_leftovers(tmp_path, {"first", "SHA256SUMS", "second", "sums.json", "third", "bin.sha256", "bad.sha256"})


# ---------------------------------------------------------------- bad input

def test_wrong_base_by_config(base16, delta_fc, tmp_path):
    """Llama-2 instead of LLaMA-1: same shapes, different rms_norm_eps / max_position_embeddings."""
    def llama2ish(config):
        config["rms_norm_eps"], config["max_position_embeddings"] = 1e-6, 1024

    other = copy_model(base16, tmp_path / "other-base", config_edit=llama2ish, keep=_tokenizer_and_record)
    proc = run_cli("apply-delta", "--base", other, "--delta", delta_fc, "--out", tmp_path / "out")
    assert_one_line_error(proc, "not the base", "rms_norm_eps", "max_position_embeddings 1024 vs 512")
    plan_apply_delta(other, delta_fc, tmp_path / "out", skip_base_check=True)  # the override plans
    no_leftovers(tmp_path, {"other-base"})


def test_wrong_base_by_content(base16, delta_fc, tiny_derivative, tmp_path):
    """Same config and shapes, other weights: caught by the fingerprint (xquant deltas) or the embedding."""
    g = torch.Generator().manual_seed(7)

    def unrelated(tensors):
        for name, t in tensors.items():
            tensors[name] = (torch.randn(t.shape, generator=g) * t.float().std()).to(t.dtype)

    other = copy_model(base16, tmp_path / "other-base", edit=unrelated, keep=_tokenizer_and_record)
    proc = run_cli("apply-delta", "--base", other, "--delta", delta_fc, "--out", tmp_path / "out")
    assert_one_line_error(proc, "wrong base", "fingerprint", "model.layers.0.")
    ziya = tmp_path / "ziya"
    execute(plan_make_delta(base16, tiny_derivative, ziya, style="ziya"))
    published = copy_model(ziya, tmp_path / "published", keep=_tokenizer)
    proc = run_cli("apply-delta", "--base", other, "--delta", published, "--out", tmp_path / "out", "--style", "ziya")
    assert_one_line_error(proc, EMBED, "mean row cosine", "wrong base")
    no_leftovers(tmp_path, {"other-base", "ziya", "published"})


def test_shape_mismatch_on_a_layer_tensor(base16, delta_fc, tmp_path):
    name = "model.layers.1.self_attn.q_proj.weight"

    def cut(tensors):
        tensors[name] = tensors[name][:, :128].contiguous()

    bad = copy_model(delta_fc, tmp_path / "bad-delta", edit=cut, keep=_tokenizer_and_record)
    proc = run_cli("apply-delta", "--base", base16, "--delta", bad, "--out", tmp_path / "out")
    assert_one_line_error(proc, name, "256x128", "256x256")
    no_leftovers(tmp_path, {"bad-delta"})


def test_delta_missing_a_tensor(base16, delta_fc, tmp_path):
    name = "model.layers.2.mlp.up_proj.weight"
    bad = copy_model(delta_fc, tmp_path / "bad-delta", edit=lambda t: t.pop(name), keep=_tokenizer_and_record)
    proc = run_cli("apply-delta", "--base", base16, "--delta", bad, "--out", tmp_path / "out")
    assert_one_line_error(proc, "has no tensor", name)
    no_leftovers(tmp_path, {"bad-delta"})


def test_base_with_fewer_layers(base16, delta_fc, tmp_path):
    def drop_layer(tensors):
        for name in [n for n in tensors if n.startswith("model.layers.3.")]:
            del tensors[name]

    def three(config):
        config["num_hidden_layers"] = 3

    short = copy_model(base16, tmp_path / "short-base", edit=drop_layer, config_edit=three, keep=_tokenizer_and_record)
    proc = run_cli("apply-delta", "--base", short, "--delta", delta_fc, "--out", tmp_path / "out")
    assert_one_line_error(proc, "3 decoder layers", "the delta 4")
    no_leftovers(tmp_path, {"short-base"})


def test_overflow_into_inf_is_reported(base16, delta_fc, tmp_path):
    def huge(tensors):
        tensors["model.norm.weight"] = tensors["model.norm.weight"] + 1e6

    bad = copy_model(delta_fc, tmp_path / "bad-delta", edit=huge, keep=_tokenizer_and_record)
    proc = run_cli("apply-delta", "--base", base16, "--delta", bad, "--out", tmp_path / "out", "--dtype", "float16")
    assert_one_line_error(proc, "model.norm.weight", "overflow float16", "--dtype bfloat16")
    no_leftovers(tmp_path, {"bad-delta"})


def test_output_equal_to_an_input(base16, delta_fc, tmp_path):
    before = sorted(p.name for p in delta_fc.iterdir())
    proc = run_cli("apply-delta", "--base", base16, "--delta", delta_fc, "--out", delta_fc, "--force")
    assert_one_line_error(proc, "is the input")
    proc = run_cli("apply-delta", "--base", base16, "--delta", delta_fc, "--out", base16 / "merged")
    assert_one_line_error(proc, "inside the input")
    assert sorted(p.name for p in delta_fc.iterdir()) == before and not (base16 / "merged").exists()
