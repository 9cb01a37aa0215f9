"""Meta original -> HF on real files.

The tiny trained model (grouped-query attention, float32) is exported to Meta's layout with 1 and 2
model-parallel shards, and a multi-head bfloat16 model with a 32,256-piece tokenizer with 4 shards
(LLaMA-1 style: rope.freqs, norm_eps 1e-6). `xquant convert` must give back exactly the original
tensors (same dtype), identical transformers logits and identical token ids; bad input fails with
one line and leaves nothing behind.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import meta_fixtures
from conftest import assert_one_line_error, report, run_cli
from xquant.demo import tiny
from xquant.convert import plan_convert
from xquant.convert.meta_export import export_meta
from xquant.convert.tokenizer import probe_documents
from xquant.errors import ShapeError
from xquant.io.output import MANIFEST_NAME
from xquant.io.readers import open_hf_tensors
from xquant.pipeline import execute

# name -> (source model, shards, exporter options); "gqa-2" goes through the CLI.
VARIANTS = {
    "gqa-1": ("tiny", 1, {}),
    "gqa-2": ("tiny", 2, {"vocab_size_in_params": True}),
    "mha-4": ("mha", 4, {"rope_freqs": True}),
}
SAME_CONFIG = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_parameters", "vocab_size",
               "tie_word_embeddings", "bos_token_id", "eos_token_id", "hidden_act", "dtype")


@pytest.fixture(scope="module")
def sources() -> dict[str, Path]:
    # tiny.model_dir() rather than the tiny_model fixture: its perplexity report is not needed here.
    return {"tiny": tiny.model_dir(), "mha": meta_fixtures.mha_model_dir()}


@pytest.fixture(scope="module")
def exports(sources, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("meta")
    return {name: export_meta(sources[src], root / name, shards, **opts)
            for name, (src, shards, opts) in VARIANTS.items()}


@pytest.fixture(scope="module")
def converted(exports, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for name, meta in exports.items():
        out[name] = root / name
        if name == "gqa-2":
            run_cli("convert", meta, out[name], check=True)
        else:
            execute(plan_convert(meta, out[name]))
    return out


def _logits(path: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    ids = torch.tensor([[1, 15, 200, 7, 999, 42, 3, 1500, 31, 4]])
    with torch.inference_mode():
        return model(ids).logits


@pytest.mark.parametrize("name", list(VARIANTS))
def test_round_trip_is_exact(name, sources, exports, converted):
    src, shards, _ = VARIANTS[name]
    original, meta, out = sources[src], exports[name], converted[name]
    assert len(list(meta.glob("consolidated.*.pth"))) == shards
    a, b = open_hf_tensors(original), open_hf_tensors(out)
    assert a.names() and sorted(a.names()) == sorted(b.names())
    for n in a.names():
        x, y = a.get(n), b.get(n)
        assert x.dtype == y.dtype and torch.equal(x, y), n
    want, got = (json.loads((d / "config.json").read_text()) for d in (original, out))
    assert {k: want.get(k) for k in SAME_CONFIG} == {k: got.get(k) for k in SAME_CONFIG}
    assert got["architectures"] == ["LlamaForCausalLM"]
    # params.json has no context length: the release is recognised from norm_eps.
    assert got["max_position_embeddings"] == (2048 if src == "mha" else 4096)
    assert json.loads((out / "generation_config.json").read_text()) == {"bos_token_id": 1, "eos_token_id": 2}
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    facts = {**manifest["options"], **manifest.get("resolved", {})}  # the CLI's options, then what the planner found
    assert facts["source_format"] == "meta"
    assert facts["model_parallel_shards"] == shards
    assert torch.equal(_logits(original), _logits(out))


def test_cast_while_merging(sources, exports, tmp_path):
    """--dtype casts each shard's slice into the merged output: equal to casting the original."""
    out = execute(plan_convert(exports["gqa-2"], tmp_path / "fp16", "float16"))
    a, b = open_hf_tensors(sources["tiny"]), open_hf_tensors(out)
    for n in a.names():
        assert b.info(n).dtype == torch.float16 and torch.equal(a.get(n).half(), b.get(n)), n
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"


@pytest.mark.parametrize("name", ["gqa-1", "mha-4"])
def test_tokenizer_ids_equal_original_and_sentencepiece(name, sources, converted):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    original, out = sources[VARIANTS[name][0]], converted[name]
    assert (out / "tokenizer.model").read_bytes() == (original / "tokenizer.model").read_bytes()
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    ours, theirs = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(original)
    assert len(ours) == sp.get_piece_size() == json.loads((out / "config.json").read_text())["vocab_size"]
    docs = probe_documents()
    assert len(docs) >= 3  # zh, en and code
    top = 0
    for doc in docs:
        ids = ours(doc)["input_ids"]
        assert ids == [1, *sp.encode(doc)] == theirs(doc)["input_ids"]
        top = max(top, max(ids))
    if name == "mha-4":
        assert top >= 32000  # the extended pieces are really used
        report(f"meta convert: 32,256-piece tokenizer, highest id used on the eval texts {top}")
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["add_bos_token"] is True and config["model_max_length"] in (2048, 4096)


def test_dry_run_plan(exports, tmp_path):
    out = tmp_path / "planned"
    plan = json.loads(run_cli("convert", exports["gqa-2"], out, "--dry-run", "--json", "--dtype", "bfloat16",
                              check=True).stdout)
    rows = {r["tensor"]: r for r in plan["tensors"]}
    assert len(rows) == 4 * 9 + 3
    q, k = rows["model.layers.1.self_attn.q_proj.weight"], rows["model.layers.1.self_attn.k_proj.weight"]
    assert (q["shape"], k["shape"], q["dtype"]) == ("256x256", "64x256", "bfloat16")
    assert q["from"] == "layers.1.attention.wq.weight: cat dim 0 x2, rotary 8 heads"
    assert k["from"] == "layers.1.attention.wk.weight: cat dim 0 x2, rotary 2 heads"
    assert rows["model.norm.weight"]["from"] == "norm.weight: replicated x2"
    assert rows["model.embed_tokens.weight"]["from"] == "tok_embeddings.weight: cat dim 1 x2"
    summary = plan["summary"]
    assert "estimated peak memory" in summary and "tokenizer.json" in summary["side files"]
    notes = " | ".join(v for k, v in summary.items() if k.startswith("note"))
    assert "2 model-parallel shards" in notes and "one decoder layer: 2.88 MiB" in notes and "Llama-2" in notes
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_tokenizer_in_parent_and_tied_scores_reported(exports, tmp_path):
    """LLaMA-1's release keeps tokenizer.model beside the model folders; a tokenizer whose merges
    tie on score cannot be reproduced by a merge list, and the plan says so."""
    release = tmp_path / "LLaMA"
    shutil.copytree(exports["gqa-1"], release / "7B")
    (release / "7B" / "tokenizer.model").rename(release / "tokenizer.model")
    plan = plan_convert(release / "7B", tmp_path / "out")
    assert plan.copy_files == [release / "tokenizer.model"]
    assert any("ids equal sentencepiece" in n for n in plan.notes)
    base = (release / "tokenizer.model").read_bytes()
    (release / "tokenizer.model").write_bytes(meta_fixtures.tied_score_sentencepiece(base))
    plan = plan_convert(release / "7B", tmp_path / "out")
    assert any("differently from sentencepiece" in n for n in plan.notes), plan.notes


# params.json of Meta's releases -> (intermediate_size, max_position_embeddings) of their HF configs.
RELEASES = {
    "llama-1-7b": ({"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-06,
                    "vocab_size": -1}, 11008, 2048),
    "llama-1-13b": ({"dim": 5120, "multiple_of": 256, "n_heads": 40, "n_layers": 40, "norm_eps": 1e-06,
                     "vocab_size": -1}, 13824, 2048),
    "llama-1-33b": ({"dim": 6656, "multiple_of": 256, "n_heads": 52, "n_layers": 60, "norm_eps": 1e-06,
                     "vocab_size": -1}, 17920, 2048),
    "llama-1-65b": ({"dim": 8192, "multiple_of": 256, "n_heads": 64, "n_layers": 80, "norm_eps": 1e-05,
                     "vocab_size": -1}, 22016, 2048),
    "llama-2-7b": ({"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-05,
                    "vocab_size": -1}, 11008, 4096),
    "llama-2-13b": ({"dim": 5120, "multiple_of": 256, "n_heads": 40, "n_layers": 40, "norm_eps": 1e-05,
                     "vocab_size": -1}, 13824, 4096),
    "llama-2-70b": ({"dim": 8192, "multiple_of": 4096, "ffn_dim_multiplier": 1.3, "n_heads": 64, "n_kv_heads": 8,
                     "n_layers": 80, "norm_eps": 1e-05, "vocab_size": -1}, 28672, 4096),
    "codellama-7b": ({"dim": 4096, "n_layers": 32, "n_heads": 32, "multiple_of": 256, "ffn_dim_multiplier": 1.0,
                      "norm_eps": 1e-5, "rope_theta": 1000000}, 11008, 16384),
}


@pytest.mark.parametrize("release", list(RELEASES))
def test_release_params(release, tmp_path):
    from xquant.convert.meta_params import MetaParams, ffn_params_for, meta_ffn_size

    params, ffn, context = RELEASES[release]
    p = MetaParams.from_dict(params, tmp_path / "params.json")
    assert p.ffn_dim == ffn and p.context()[0] == context
    multiple_of, mult = ffn_params_for(p.dim, ffn)  # what the exporter writes reproduces the size
    assert meta_ffn_size(p.dim, multiple_of, mult) == ffn


def test_exporter_refuses_shards_that_split_heads(sources, tmp_path):
    with pytest.raises(ShapeError, match="num_key_value_heads 2"):
        export_meta(sources["tiny"], tmp_path / "m", 4)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- bad input

def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(MANIFEST_NAME))
    return dst


def _resave(path: Path, edit) -> None:
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)


def _fails(meta: Path, *needles: str) -> None:
    out = meta.parent / "out"
    assert_one_line_error(run_cli("convert", meta, out), *needles)
    assert {p.name for p in meta.parent.iterdir()} == {meta.name}  # no output, no temp dir


def test_params_json_missing(exports, tmp_path):
    m = _copy(exports["gqa-2"], tmp_path / "m")
    (m / "params.json").unlink()
    _fails(m, "params.json")


def test_params_inconsistent_with_shapes(exports, tmp_path):
    m = _copy(exports["gqa-2"], tmp_path / "m")
    params = json.loads((m / "params.json").read_text())
    (m / "params.json").write_text(json.dumps({**params, "multiple_of": 512}))
    _fails(m, "consolidated.00.pth", "layers.0.feed_forward.w1.weight", "384x256", "multiple_of 512")


def test_shards_with_mismatching_keys(exports, tmp_path):
    m = _copy(exports["gqa-2"], tmp_path / "m")
    _resave(m / "consolidated.01.pth", lambda s: s.pop("layers.2.feed_forward.w3.weight"))
    _fails(m, "consolidated.01.pth", "layers.2.feed_forward.w3.weight", "lacks")


def test_missing_shard(exports, tmp_path):
    m = _copy(exports["gqa-2"], tmp_path / "m")
    (m / "consolidated.01.pth").unlink()
    _fails(m, "consolidated.01.pth is missing")


def test_shard_count_not_dividing_heads(exports, tmp_path):
    m = _copy(exports["gqa-2"], tmp_path / "m")
    shutil.copy(m / "consolidated.01.pth", m / "consolidated.02.pth")
    _fails(m, "3 model-parallel shards", "do not divide n_heads 8")


def test_unknown_tensor(exports, tmp_path):
    m = _copy(exports["gqa-1"], tmp_path / "m")
    _resave(m / "consolidated.00.pth", lambda s: s.update({"layers.0.attention.wz.weight": torch.zeros(4, 4)}))
    _fails(m, "consolidated.00.pth", "unknown tensor 'layers.0.attention.wz.weight'")


def test_replicated_copies_differ(exports, tmp_path):
    """Found while streaming, after output has started: the partial output is removed."""
    m = _copy(exports["gqa-2"], tmp_path / "m")
    _resave(m / "consolidated.01.pth", lambda s: s["layers.3.ffn_norm.weight"].mul_(2))
    plan = plan_convert(m, tmp_path / "out")
    with pytest.raises(ShapeError, match=r"consolidated\.01\.pth: replicated tensor 'layers\.3\.ffn_norm\.weight' "
                                         "differs"):
        execute(plan)
    assert {p.name for p in tmp_path.iterdir()} == {"m"}
