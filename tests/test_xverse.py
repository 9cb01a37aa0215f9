"""XVERSE (`XverseForCausalLM`) through gguf / gptq / int8 / report / inspect, on a tiny XVERSE-shaped
checkpoint (tests/fixtures_xverse.py): the tiny LLaMA's weights, config XverseForCausalLM, and a
SentencePiece-style BPE tokenizer.json with byte fallback and no tokenizer.model, as XVERSE ships.

XVERSE's modeling code is remote code transformers does not have, and its math is LLaMA's: the
reference is the same files named LlamaForCausalLM (fixtures_xverse.reference_dir()).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import fixtures_xverse
from conftest import assert_one_line_error, report, run_cli
from helpers import copy_model, hf_logits, llama_cpp_logits
from xquant.calib import load_set
from xquant.io.readers import open_hf_tensors

llama_cpp = pytest.importorskip("llama_cpp", reason="the llamacpp extra (llama-cpp-python) is not installed")
gguf = pytest.importorskip("gguf")

from xquant.gguf import convert_gguf  # noqa: E402
from xquant.gguf.kquant import load_llama  # noqa: E402
from xquant.gguf.vocab import BYTE, CONTROL, NORMAL, _detect  # noqa: E402

GPTQ_ARGS = ("--samples", "4", "--seq-len", "64", "--group-size", "32")


@pytest.fixture(scope="module")
def xverse() -> Path:
    return fixtures_xverse.xverse_dir()


@pytest.fixture(scope="module")
def reference():
    """(directory, transformers LLaMA model, tokenizer from tokenizer.json) of the LLaMA-named twin."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = fixtures_xverse.reference_dir()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return path, model, AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def ggufs(xverse, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("xverse-gguf")
    return {t: convert_gguf(xverse, out / f"xverse-{t}.gguf", t).paths[0] for t in ("f32", "q8_0")}


@pytest.fixture(scope="module")
def window(reference) -> list[int]:
    _, _, tok = reference
    return tok(load_set("mixed", "eval").documents[0])["input_ids"][:256]


def test_gguf_metadata_and_vocabulary(ggufs, xverse):
    """arch xverse; tokenizer.ggml.model llama / pre default (as llama.cpp's XVERSE converter writes),
    byte tokens typed byte, specials control, merge-order scores, the Metaspace space prefix."""
    reader = gguf.GGUFReader(ggufs["q8_0"])
    field = lambda name: reader.get_field(name).contents()  # noqa: E731
    assert field("general.architecture") == "xverse"
    assert field("xverse.block_count") == 4 and field("xverse.attention.head_count_kv") == 2
    assert (field("tokenizer.ggml.model"), field("tokenizer.ggml.pre")) == ("llama", "default")
    assert field("tokenizer.ggml.add_space_prefix") is True
    assert (field("tokenizer.ggml.bos_token_id"), field("tokenizer.ggml.eos_token_id")) == (1, 2)
    tokens, types, scores = (field(f"tokenizer.ggml.{k}") for k in ("tokens", "token_type", "scores"))
    assert len(tokens) == len(types) == len(scores) == 2000
    assert types[:3] == [CONTROL] * 3 and types[3:259] == [BYTE] * 256 and tokens[3] == "<0x00>"
    assert types.count(NORMAL) == 2000 - 259
    merged = json.loads((xverse / "tokenizer.json").read_text())["model"]["merges"]
    first = merged[0] if isinstance(merged[0], str) else " ".join(merged[0])
    assert scores[tokens.index(first.replace(" ", ""))] == 0.0  # the first merge scores highest
    assert _detect(xverse) == "sentencepiece-json"  # also found without converters/xverse.toml naming it
    info = json.loads(run_cli("inspect", ggufs["f32"], "--json", check=True).stdout)
    assert info["architecture"] == "xverse"
    info = json.loads(run_cli("inspect", xverse, "--json", check=True).stdout)
    assert (info["architecture"], info["xquant_arch"]) == ("XverseForCausalLM", "xverse")


def test_gguf_logits_match_the_llama_reference(ggufs, reference, window):
    """llama.cpp's xverse graph on the converted file = transformers' LLaMA on the same weights
    (q/k un-permuted with the true kv-head count: the tiny model has grouped-query attention)."""
    _, model, _ = reference
    ref = hf_logits(model, window)
    diff = (llama_cpp_logits(ggufs["f32"], window, torch.float32) - ref).abs().max().item()
    q8 = llama_cpp_logits(ggufs["q8_0"], window, torch.float32)
    top1 = (q8.argmax(-1) == ref.argmax(-1)).float().mean().item()
    report(f"xverse gguf: f32 max |logit diff| {diff:.2e}; q8_0 max {(q8 - ref).abs().max().item():.3f}, "
           f"top-1 agreement {top1:.1%} over {len(window)} tokens")
    assert diff < 1e-3
    assert top1 > 0.95 and (q8 - ref).abs().max().item() < 0.25


def test_gguf_tokenizer_matches_tokenizer_json(ggufs, reference):
    """llama.cpp's SentencePiece tokenizer, given merge-order scores, gives transformers' ids on every
    bundled zh/en/code eval document (measured without scores: 61 of the 85 calibration and eval
    documents differed)."""
    _, _, tok = reference
    llm = load_llama(ggufs["f32"], vocab_only=True)
    n_docs = n_ids = 0
    for name in ("zh", "en", "code"):
        for doc in load_set(name, "eval").documents:
            want = tok(doc)["input_ids"]
            assert llm.tokenize(doc.encode(), add_bos=True, special=False) == want, (name, doc[:60])
            n_docs, n_ids = n_docs + 1, n_ids + len(want)
    # Special tokens written in the text (special=True): both add the "▁" prefix to the text after
    # each of them, as after the start of text (the tokenizer.json xquant writes prepends it in a
    # normalizer, as SentencePiece does, not in a pre-tokenizer that would add it only once).
    text = "数据 x=1\n\tdef f():  return 0xFF"
    plain = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(plain[0]) == "\u2581"
    assert llm.tokenize(f"<s>{text}</s>".encode(), add_bos=False, special=True) == [1, *plain, 2]
    assert tok(f"<s>{text}</s>", add_special_tokens=False)["input_ids"] == [1, *plain, 2]
    report(f"xverse gguf tokenizer: {n_docs} eval documents, {n_ids} ids, identical to tokenizer.json")


def _as_llama(src: Path, dst: Path) -> Path:
    """A copy of an XVERSE artifact whose config names LlamaForCausalLM (what transformers can load)."""

    def rename(config: dict) -> None:
        assert config["architectures"] == ["XverseForCausalLM"] and config["model_type"] == "xverse"
        config.update(architectures=["LlamaForCausalLM"], model_type="llama")

    return copy_model(src, dst, config_edit=rename)


def _same_tensors(a: Path, b: Path) -> int:
    ra, rb = open_hf_tensors(a), open_hf_tensors(b)
    assert sorted(ra.names()) == sorted(rb.names())
    for name in ra.names():
        assert torch.equal(ra.get(name), rb.get(name)), name
    return len(ra.names())


@pytest.mark.parametrize("command,args", [("int8", ()), ("gptq", GPTQ_ARGS)])
def test_quantized_xverse_equals_llama_named_copy_and_loads(command, args, xverse, reference, window, tmp_path):
    """`xquant int8` / `xquant gptq` on XVERSE write exactly what they write for the LLaMA-named
    twin (config aside), and the result loads in transformers once config says LlamaForCausalLM."""
    ref_dir, model, _ = reference
    run_cli(command, xverse, tmp_path / "x", *args, check=True)
    run_cli(command, ref_dir, tmp_path / "l", *args, check=True)
    n = _same_tensors(tmp_path / "x", tmp_path / "l")
    assert json.loads((tmp_path / "x" / "config.json").read_text())["architectures"] == ["XverseForCausalLM"]
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(_as_llama(tmp_path / "x", tmp_path / "as-llama")).eval()
    got, ref = hf_logits(loaded, window), hf_logits(model, window)
    top1 = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    report(f"xverse {command}: {n} tensors equal to the LLaMA-named run; reloaded top-1 agreement {top1:.1%}")
    assert top1 > 0.8


def test_report_over_xverse_artifacts(ggufs, xverse, tmp_path):
    """`xquant report` takes the XVERSE directory itself as the reference (loaded as the LLaMA
    class with the same math) and evaluates its GGUFs in llama.cpp and its int8 in bitsandbytes."""
    from xquant.report import build_report

    int8 = tmp_path / "xverse-int8"
    run_cli("int8", xverse, int8, check=True)
    result = build_report(xverse, [ggufs["f32"], ggufs["q8_0"], int8], tmp_path / "r", ["en"], [], 256)
    rows = {r["name"]: r for r in result["artifacts"]}
    assert all("error" not in r for r in rows.values()), rows
    assert "as LlamaForCausalLM" in rows[xverse.name]["engine"]
    assert "bitsandbytes" in rows["xverse-int8"]["engine"] and rows["xverse-int8"]["sets"]["en"]["kl"] < 1e-3
    f32, q8 = rows[ggufs["f32"].name]["sets"]["en"], rows[ggufs["q8_0"].name]["sets"]["en"]
    assert "llama.cpp" in rows[ggufs["f32"].name]["engine"]
    assert f32["kl"] < 1e-6 and f32["top1"] == 1.0 and 0 < q8["kl"] < 1e-3
    assert (tmp_path / "r" / "report.md").is_file()


def test_vocab_size_smaller_than_tokenizer_json_is_one_line_error(xverse, tmp_path):
    bad = tmp_path / "bad"
    def shrink(tensors):  # embedding and output agree with vocab_size 1999; tokenizer.json still has 2000
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            tensors[name] = tensors[name][:1999].clone()

    copy_model(xverse, bad, edit=shrink, config_edit=lambda config: config.update(vocab_size=1999))
    assert_one_line_error(run_cli("gguf", bad, tmp_path / "o.gguf", "--outtype", "f32"),
                          "config.json", "vocab_size 1999", "2000 tokens (tokenizer.json)")
