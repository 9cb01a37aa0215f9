"""Inputs that are wrong must be refused, not converted (issue 15, part B).

Each case copies the tiny model (or its Meta export), damages the copy in one way, runs the real CLI
and checks: a non-zero exit, one line on stderr naming the file and the tensor or key, no traceback,
no output left behind (nor its `.NAME.xquant-tmp` sibling), and the input unchanged byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import struct
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import assert_one_line_error, run_cli
from xquant.demo import tiny

TINY_LAYERS = tiny.SPEC.num_layers
Q0 = "model.layers.0.self_attn.q_proj.weight"


# ---------------------------------------------------------------- helpers

def _digests(root: Path) -> dict[str, str]:
    """sha256 of every file under root (or of root itself), symlinks as their targets' names."""
    if root.is_symlink():
        return {root.name: "-> " + os.readlink(root)}
    paths = [root] if root.is_file() else sorted(root.rglob("*"))
    out = {}
    for p in paths:
        rel = str(p.relative_to(root.parent))
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def refused(args: list, src: Path, out: Path, *needles: str) -> str:
    """Run `xquant *args`; it must fail in one line holding every needle, leave nothing at `out`
    (nor any temporary beside it) and leave `src` as it was. Returns the line."""
    before = _digests(src)
    siblings = set(out.parent.iterdir()) if out.parent.exists() else set()
    proc = run_cli(*args)
    assert_one_line_error(proc, *needles)
    assert not out.exists(), out
    assert not list(out.parent.glob(f".{out.name}*")), list(out.parent.iterdir())
    after = set(out.parent.iterdir()) if out.parent.exists() else set()
    assert after == siblings, after - siblings
    assert _digests(src) == before, "the input was modified"
    return proc.stderr.strip()


def _copy(tiny_model: Path, dst: Path) -> Path:
    shutil.copytree(tiny_model, dst)
    return dst


def _edit_config(model: Path, **changes) -> None:
    path = model / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config, indent=2))


def _read_st_header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write_st(path: Path, header: dict, data: bytes) -> None:
    """A safetensors file written by hand, so that its header can say anything."""
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def _set_values(model: Path, name: str, values: dict[tuple[int, ...], float]) -> None:
    """Overwrite a few elements of one tensor of model.safetensors in place (same layout)."""
    path = model / "model.safetensors"
    header, data = _read_st_header(path)
    spec = header[name]
    assert spec["dtype"] == "F32"
    begin, end = spec["data_offsets"]
    t = torch.frombuffer(bytearray(data[begin:end]), dtype=torch.float32).reshape(spec["shape"])
    for index, v in values.items():
        t[index] = v
    _write_st(path, header, data[:begin] + t.numpy().tobytes() + data[end:])


def _flip_byte_in_member(path: Path, member: str) -> None:
    """Flip one byte in the middle of a zip member's stored bytes (its CRC-32 no longer matches)."""
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(member)
    raw = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26: info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len
    raw[start + info.file_size // 2] ^= 0x10
    path.write_bytes(bytes(raw))


def _save_state(path: Path, state: dict[str, torch.Tensor], **kw) -> list[str]:
    """torch.save each tensor with its own storage; returns the storage members in key order
    (torch numbers storages in the order the pickle first meets them)."""
    torch.save({k: v.clone() for k, v in state.items()}, path, **kw)
    with zipfile.ZipFile(path) as z:
        prefix = z.namelist()[0].split("/")[0]
    return [f"{prefix}/data/{i}" for i in range(len(state))]


@pytest.fixture(scope="module")
def meta_model(tmp_path_factory) -> Path:
    """The tiny model in Meta's layout (one shard), saved with one storage per tensor."""
    from xquant.convert.meta_export import export_meta

    meta = export_meta(tiny.model_dir(), tmp_path_factory.mktemp("meta") / "tiny-meta", 1)
    shard = meta / "consolidated.00.pth"
    state = torch.load(shard, weights_only=True)
    _save_state(shard, state)
    return meta


@pytest.fixture
def out_dir(tmp_path) -> Path:
    d = tmp_path / "outputs"
    d.mkdir()
    return d


# ---------------------------------------------------------------- 1. safetensors offsets, dtype

def _overlap(header: dict, data: bytes) -> tuple[dict, bytes, str]:
    """Two tensors of one size share bytes: the later one is pointed at the earlier one's data."""
    by_size: dict[int, list[str]] = {}
    for name, spec in header.items():
        if name != "__metadata__":
            by_size.setdefault(spec["data_offsets"][1] - spec["data_offsets"][0], []).append(name)
    pair = next(names for names in by_size.values() if len(names) >= 2)[:2]
    a, b = sorted(pair, key=lambda n: header[n]["data_offsets"][0])
    header[b]["data_offsets"] = list(header[a]["data_offsets"])
    return header, data, "overlaps"


def _gap(header: dict, data: bytes) -> tuple[dict, bytes, str]:
    """Every tensor moved 8 bytes on: 8 bytes before the first belong to no tensor."""
    for name, spec in header.items():
        if name != "__metadata__":
            spec["data_offsets"] = [x + 8 for x in spec["data_offsets"]]
    return header, bytes(8) + data, "belong to no tensor"


def _beyond(header: dict, data: bytes) -> tuple[dict, bytes, str]:
    """The last tensor's offsets point past the end of the file."""
    return header, data[:-32], "truncated"


def _trailing(header: dict, data: bytes) -> tuple[dict, bytes, str]:
    return header, data + bytes(16), "belong to no tensor"


def _bad_dtype(header: dict, data: bytes) -> tuple[dict, bytes, str]:
    header[Q0]["dtype"] = "F33"
    return header, data, "'F33'"


@pytest.mark.parametrize("damage", [_overlap, _gap, _beyond, _trailing, _bad_dtype],
                         ids=["overlap", "gap", "beyond-file", "trailing-bytes", "dtype-F33"])
def test_safetensors_header_lies(tiny_model, tmp_path, out_dir, damage):
    src = _copy(tiny_model, tmp_path / "m")
    header, data, needle = damage(*_read_st_header(src / "model.safetensors"))
    _write_st(src / "model.safetensors", header, data)
    line = refused(["convert", src, out_dir / "out"], src, out_dir / "out", "model.safetensors", needle)
    assert "tensor '" in line or "bytes" in line


# ---------------------------------------------------------------- 2. zip CRC of .bin / .pth

def test_bin_with_bad_crc(tiny_model, tmp_path, out_dir):
    from xquant.io.readers import open_hf_tensors

    src = tmp_path / "legacy"
    src.mkdir()
    shutil.copy(tiny_model / "config.json", src)
    reader = open_hf_tensors(tiny_model)
    state = {n: reader.get(n) for n in reader.names()}
    members = _save_state(src / "pytorch_model.bin", state)
    _flip_byte_in_member(src / "pytorch_model.bin", members[list(state).index(Q0)])
    refused(["convert", src, out_dir / "out"], src, out_dir / "out", "pytorch_model.bin", Q0, "CRC")


def test_meta_pth_with_bad_crc(meta_model, tmp_path, out_dir):
    src = shutil.copytree(meta_model, tmp_path / "meta")
    shard = src / "consolidated.00.pth"
    names = list(torch.load(shard, weights_only=True, mmap=True))
    target = "layers.1.attention.wq.weight"
    with zipfile.ZipFile(shard) as z:
        prefix = z.namelist()[0].split("/")[0]
    _flip_byte_in_member(shard, f"{prefix}/data/{names.index(target)}")
    refused(["convert", src, out_dir / "out", "--dtype", "float16"], src, out_dir / "out",
            "consolidated.00.pth", target, "CRC")


# ---------------------------------------------------------------- 3. config.json vs tensors

CONFIG_CASES = {
    # id: (config changes, command, needles)
    "hidden-int8": ({"hidden_size": 512}, ["int8"], ["hidden_size 512", "model.embed_tokens.weight", "2000x256"]),
    "hidden-nf4": ({"hidden_size": 512}, ["nf4"], ["hidden_size 512", "model.embed_tokens.weight"]),
    "hidden-gguf": ({"hidden_size": 512}, ["gguf", "--outtype", "f16"],
                    ["hidden_size 512", "model.embed_tokens.weight"]),
    "hidden-convert": ({"hidden_size": 128}, ["convert"], ["hidden_size 128", "model.embed_tokens.weight"]),
    "heads-convert": ({"num_attention_heads": 3, "num_key_value_heads": 3, "head_dim": None}, ["convert"],
                      ["hidden_size 256", "num_attention_heads 3"]),
    "heads-q-rows": ({"num_attention_heads": 4, "num_key_value_heads": 2}, ["convert"],
                     ["num_attention_heads 4", Q0, "256x256", "expected 128x256"]),
    "kv-heads-int8": ({"num_key_value_heads": 8}, ["int8"],
                      ["num_key_value_heads 8", "model.layers.0.self_attn.k_proj.weight"]),
    "vocab-int8": ({"vocab_size": 1500}, ["int8"], ["vocab_size 1500", "model.embed_tokens.weight", "2000x256"]),
    "intermediate-nf4": ({"intermediate_size": 512}, ["nf4"],
                         ["intermediate_size 512", "model.layers.0.mlp.gate_proj.weight"]),
    "fewer-layers-gguf": ({"num_hidden_layers": TINY_LAYERS - 1}, ["gguf"],
                          [f"num_hidden_layers {TINY_LAYERS - 1}", f"model.layers.{TINY_LAYERS - 1}."]),
    "more-layers-gguf": ({"num_hidden_layers": TINY_LAYERS + 1}, ["gguf"],
                         [f"num_hidden_layers {TINY_LAYERS + 1}", f"layer {TINY_LAYERS}"]),
    "more-layers-int8": ({"num_hidden_layers": TINY_LAYERS + 1}, ["int8"], [f"num_hidden_layers {TINY_LAYERS + 1}"]),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_config_disagrees_with_tensors(tiny_model, tmp_path, out_dir, case):
    changes, command, needles = CONFIG_CASES[case]
    src = _copy(tiny_model, tmp_path / "m")
    _edit_config(src, **changes)
    out = out_dir / ("out.gguf" if command[0] == "gguf" else "out")
    refused([command[0], src, out, *command[1:]], src, out, "config.json", *needles)


def test_meta_params_heads(meta_model, tmp_path, out_dir):
    src = shutil.copytree(meta_model, tmp_path / "meta")
    params = json.loads((src / "params.json").read_text())
    params["n_heads"] = 3
    (src / "params.json").write_text(json.dumps(params))
    refused(["convert", src, out_dir / "out"], src, out_dir / "out", "params.json", "n_heads 3")


# ---------------------------------------------------------------- 4. the shard index

@pytest.fixture(scope="module")
def sharded(tiny_model, tmp_path_factory) -> Path:
    m = tmp_path_factory.mktemp("sharded") / "m"
    run_cli("convert", tiny_model, m, "--max-shard-size", "3MB", check=True)
    return m


def _ghost(index: dict) -> str:
    index["weight_map"]["model.layers.0.self_attn.ghost.weight"] = index["weight_map"][Q0]
    return "model.layers.0.self_attn.ghost.weight"


def _wrong_shard(index: dict) -> str:
    shards = sorted(set(index["weight_map"].values()))
    here = index["weight_map"][Q0]
    index["weight_map"][Q0] = next(s for s in shards if s != here)
    return Q0


def _unlisted(index: dict) -> str:
    del index["weight_map"][Q0]
    return Q0


@pytest.mark.parametrize("damage", [_ghost, _wrong_shard, _unlisted], ids=["no-such-tensor", "wrong-shard", "unlisted"])
def test_index_disagrees_with_shards(sharded, tmp_path, out_dir, damage):
    src = shutil.copytree(sharded, tmp_path / "m")
    path = src / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    name = damage(index)
    path.write_text(json.dumps(index, indent=2))
    refused(["convert", src, out_dir / "out"], src, out_dir / "out", "model.safetensors.index.json", name)


# ---------------------------------------------------------------- 5. NaN / inf

NONFINITE_CASES = {
    # id: (tensor, bad values, command, needles)
    "inf-convert-f16": (Q0, {(3, 5): math.inf}, ["convert", "--dtype", "float16"], ["1 inf value"]),
    "nan-convert-copy": (Q0, {(0, 0): math.nan}, ["convert"], ["1 NaN value"]),  # unchanged bytes
    "overflow-convert-f16": (Q0, {(1, 1): 1e6}, ["convert", "--dtype", "float16"], ["float16's range"]),
    "inf-gguf-f16": (Q0, {(3, 5): math.inf}, ["gguf", "--outtype", "f16"], ["inf"]),
    "inf-gguf-q8_0": (Q0, {(3, 5): -math.inf}, ["gguf", "--outtype", "q8_0"], ["inf"]),
    "nan-gguf-f32": ("model.norm.weight", {(7,): math.nan}, ["gguf", "--outtype", "f32"], ["NaN"]),  # kernel copy
    "nan-int8": (Q0, {(2, 2): math.nan}, ["int8"], ["NaN"]),
    "nan-int8-kept": ("model.embed_tokens.weight", {(9, 9): math.nan}, ["int8"], ["NaN"]),
    "inf-nf4": ("model.layers.1.mlp.down_proj.weight", {(0, 3): math.inf}, ["nf4"], ["inf"]),
}


@pytest.mark.parametrize("case", list(NONFINITE_CASES))
def test_nonfinite_weights(tiny_model, tmp_path, out_dir, case):
    name, values, command, needles = NONFINITE_CASES[case]
    src = _copy(tiny_model, tmp_path / "m")
    _set_values(src, name, values)
    out = out_dir / ("out.gguf" if command[0] == "gguf" else "out")
    refused([command[0], src, out, *command[1:]], src, out, "model.safetensors", f"'{name}'", *needles)


@pytest.mark.parametrize("tensor, value, args", [
    ("layers.2.feed_forward.w3.weight", math.nan, ["--dtype", "bfloat16"]),  # a cast: the result is scanned
    ("layers.2.feed_forward.w3.weight", math.nan, []),  # same dtype: the reader's scan while checking the CRC
    ("layers.1.attention.wq.weight", math.inf, []),  # rotary-reordered rows, same dtype
], ids=["cast", "same-dtype", "rotary-inf"])
def test_nonfinite_meta(meta_model, tmp_path, out_dir, tensor, value, args):
    src = shutil.copytree(meta_model, tmp_path / "meta")
    shard = src / "consolidated.00.pth"
    state = torch.load(shard, weights_only=True)
    state[tensor][4, 4] = value
    _save_state(shard, state)
    refused(["convert", src, out_dir / "out", *args], src, out_dir / "out",
            "consolidated.00.pth", f"'{tensor}'", "NaN" if math.isnan(value) else "inf")



@pytest.mark.parametrize("command", [["convert", "--dtype", "float16"], ["convert"], ["gguf", "--outtype", "f16"],
                                     ["gguf", "--outtype", "f32"]], ids=" ".join)
def test_allow_nonfinite_passes_them_and_says_so(tiny_model, tmp_path, command):
    """The explicit option lets NaN/inf through where a format can hold them (casts and copies;
    quantizers always refuse) and the manifest records it."""
    src = _copy(tiny_model, tmp_path / "m")
    _set_values(src, Q0, {(3, 5): math.inf, (0, 0): math.nan})
    out = tmp_path / ("o.gguf" if command[0] == "gguf" else "o")
    run_cli(command[0], src, out, *command[1:], "--allow-nonfinite", check=True)
    manifest = out.parent / f"{out.name}.xquant-manifest.json" if command[0] == "gguf" else out / "xquant-manifest.json"
    assert json.loads(manifest.read_text())["options"]["allow_nonfinite"] is True
    if command[0] == "convert":
        from safetensors.torch import load_file

        w = load_file(out / "model.safetensors")[Q0]
        assert torch.isinf(w[3, 5]) and torch.isnan(w[0, 0])

def test_check_finite_flag():
    """The rule's one switch: `allow` (each plan's allow_nonfinite) lets NaN/inf through."""
    from xquant.io.finite import NonFiniteError, check_finite

    bad = torch.tensor([1.0, math.nan, math.inf], dtype=torch.bfloat16)
    with pytest.raises(NonFiniteError, match=r"f\.bin: tensor 'w' holds 1 NaN and 1 inf values \(the first at \[1\]\)"):
        check_finite("w", bad, "f.bin")
    check_finite("w", bad, "f.bin", allow=True)
    check_finite("w", torch.tensor([1, 2]), "f.bin")  # integers hold no NaN


# ---------------------------------------------------------------- 6. smaller ones

def test_plain_pickle_with_code(tmp_path, out_dir):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    meta = tmp_path / "meta"
    meta.mkdir()
    (meta / "params.json").write_text(json.dumps({"dim": 8, "n_layers": 1, "n_heads": 2}))
    shutil.copy(tiny.tokenizer_dir() / "tokenizer.model", meta)
    torch.save({"tok_embeddings.weight": torch.zeros(4, 8), "evil": Evil()}, meta / "consolidated.00.pth",
               _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(meta / "consolidated.00.pth")
    for args in (["inspect", meta], ["convert", meta, out_dir / "out"]):
        line = refused(args, meta, out_dir / "out", "consolidated.00.pth", "refused", "posix.system")
        assert "weights_only" not in line and "Warning" not in line
    assert not (tmp_path / "pwned").exists()


def test_symlink_loop(tmp_path, out_dir):
    a, b = tmp_path / "a", tmp_path / "b"
    a.symlink_to(b)
    b.symlink_to(a)
    refused(["inspect", a], a, out_dir / "out", str(a), "symlink loop")
    refused(["convert", a, out_dir / "out"], a, out_dir / "out", str(a), "symlink loop")


# ---------------------------------------------------------------- 7. report: one metric skipped

def test_report_skips_a_metric_it_cannot_compute(tiny_model, tmp_path):
    """A tokenizer without pieces for ' A'..' D' begins every option with the same token: MC cannot
    be scored by first token, so that column is skipped with a note, and the rest is computed."""
    from xquant.evaluate.mc import choice_token_ids, load_mc
    from xquant.report import default_mc

    sp = tiny.train_sentencepiece([re.sub("[A-D]", "", line) for line in tiny.corpus_lines()], tiny.SPEC.vocab_size)
    ref = _copy(tiny_model, tmp_path / "ref")
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        (ref / name).unlink(missing_ok=True)
    tiny.save_hf_tokenizer(sp, ref)
    import sentencepiece as spm

    with pytest.raises(Exception, match="distinct tokens"):  # the premise, checked
        choice_token_ids(spm.SentencePieceProcessor(model_proto=sp).encode, load_mc(default_mc()[0])[0].prompt())
    other = shutil.copytree(ref, tmp_path / "other")
    out = tmp_path / "r"
    run_cli("report", ref, other, "--out", out, "--eval", "en", "--max-tokens", "256", check=True)
    rep = json.loads((out / "report.json").read_text())
    import jsonschema

    from xquant.report import SCHEMA_PATH

    jsonschema.validate(rep, json.loads(SCHEMA_PATH.read_text()))
    for row in rep["artifacts"]:
        assert "error" not in row, row
        assert row["mc"] == {}
        assert row["sets"]["en"]["ppl"] > 0
        assert [n["metric"] for n in row["notes"]] == ["MC bilingual"]
        assert "distinct tokens" in row["notes"][0]["skipped"]
    md = (out / "report.md").read_text()
    assert "MC bilingual skipped: the four option letters" in md
    assert "| skipped |" in md
