"""`xquant gguf` on the tiny trained model, checked in llama.cpp (llama-cpp-python) and transformers.

Figures (perplexity, KL divergence to the reference) are printed with conftest.report. llama.cpp
runs with one thread: on a busy 2-core machine its thread pool is several times slower with two.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, assert_one_line_error, report, run_cli
from helpers import copy_model, write_safetensors
from xquant.demo import tiny
from xquant.calib import load_set
from xquant.evaluate.perplexity import nll_sum, windows
from xquant.io.hashing import sha256_file
from xquant.io.output import MANIFEST_NAME, read_manifest
from xquant.io.readers import open_hf_tensors

llama_cpp = pytest.importorskip("llama_cpp", reason="the llamacpp extra (llama-cpp-python) is not installed")
gguf = pytest.importorskip("gguf")

from xquant.gguf import convert_gguf, plan_gguf  # noqa: E402
from xquant.gguf.kquant import load_llama  # noqa: E402

THREADS = dict(n_threads=1, n_threads_batch=1)
EVAL_WINDOWS = 16  # every third 512-token window of the mixed eval split (~8k tokens)


@pytest.fixture(scope="module")
def reference(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def eval_windows(reference):
    _, tok = reference
    return windows(tiny.encode_set(tok, "mixed", "eval"), 512)[::3][:EVAL_WINDOWS]


@pytest.fixture(scope="module")
def ref_logits(reference, eval_windows):
    model, _ = reference
    with torch.inference_mode():
        return [model(torch.tensor([w])).logits[0].double() for w in eval_windows]


@pytest.fixture(scope="module")
def files(tiny_model, tmp_path_factory) -> dict[str, Path]:
    """The tiny model in every type the quality test compares, written once per module."""
    out = tmp_path_factory.mktemp("gguf")
    made = {}
    for name in ("f32", "f16", "q8_0", "q4_0", "q4_k_m"):
        made[name] = convert_gguf(tiny_model, out / f"tiny-{name}.gguf", name).paths[0]
    made["q4_k_m+imatrix"] = convert_gguf(tiny_model, out / "tiny-q4_k_m-imatrix.gguf", "q4_k_m", "mixed",
                                          imatrix_chunks=16, save_imatrix=out / "tiny.imatrix.gguf",
                                          threads=1).paths[0]
    made["imatrix"] = out / "tiny.imatrix.gguf"
    return made


def _llama_logits(llm, ids: list[int]) -> torch.Tensor:
    llm.reset()
    llm.eval(ids)
    return torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float64))


def _eval(path: Path, eval_windows, ref_logits) -> tuple[float, float]:
    """(perplexity, mean KL(reference || file)) over the eval windows, in llama.cpp."""
    llm = load_llama(path, **THREADS)
    try:
        nll, count, kl, positions = 0.0, 0, 0.0, 0
        for w, ref in zip(eval_windows, ref_logits):
            logits = _llama_logits(llm, w)
            s, n = nll_sum(logits, w)
            nll, count = nll + s, count + n
            p = torch.log_softmax(ref, -1)
            kl += float((p.exp() * (p - torch.log_softmax(logits, -1))).sum())
            positions += len(w)
    finally:
        llm.close()
    return math.exp(nll / count), kl / positions


# ---------------------------------------------------------------- correctness in llama.cpp

def test_f32_logits_match_transformers(files, reference):
    model, tok = reference
    fp32_cache = load_llama(files["f32"], f32_cache=True, **THREADS)
    default_cache = load_llama(files["f32"], **THREADS)
    try:
        worst, worst_default = 0.0, 0.0
        for name in ("zh", "en", "code"):
            ids = tok(load_set(name, "eval").documents[0])["input_ids"][:512]
            with torch.inference_mode():
                ref = model(torch.tensor([ids])).logits[0].double()
            worst = max(worst, float((_llama_logits(fp32_cache, ids) - ref).abs().max()))
            worst_default = max(worst_default, float((_llama_logits(default_cache, ids) - ref).abs().max()))
    finally:
        fp32_cache.close()
        default_cache.close()
    report(f"gguf f32 vs transformers: max |logit diff| {worst:.2e} (f32 KV cache), "
           f"{worst_default:.2e} (llama.cpp's default f16 KV cache)")
    assert worst < 1e-3


def test_tokenizer_matches_transformers(files, reference):
    _, tok = reference
    llm = load_llama(files["f16"], vocab_only=True)
    try:
        for name in ("zh", "en", "code"):
            for doc in load_set(name, "eval").documents:
                assert llm.tokenize(doc.encode(), add_bos=True, special=False) == tok(doc)["input_ids"], name
    finally:
        llm.close()


def test_quality_ordering_and_imatrix(files, eval_windows, ref_logits):
    results = {name: _eval(files[name], eval_windows, ref_logits)
               for name in ("f16", "q8_0", "q4_k_m", "q4_k_m+imatrix", "q4_0")}
    ref_nll = sum(nll_sum(r, w)[0] for r, w in zip(ref_logits, eval_windows))
    ref_ppl = math.exp(ref_nll / sum(len(w) - 1 for w in eval_windows))
    report(f"gguf held-out perplexity ({len(eval_windows)} windows of mixed eval; transformers fp32 {ref_ppl:.3f}): "
           + ", ".join(f"{k} {p:.3f} (KL {kl:.2e}, {files[k].stat().st_size / 1e6:.2f} MB)"
                       for k, (p, kl) in results.items()))
    ppl = {k: v[0] for k, v in results.items()}
    kl = {k: v[1] for k, v in results.items()}
    # Perplexity moves little on a tiny model; its order must hold within 0.5 %. KL to the reference
    # measures the same damage with far less noise, so its order is strict.
    for better, worse in (("f16", "q8_0"), ("q8_0", "q4_k_m"), ("q4_k_m", "q4_0")):
        assert ppl[better] <= ppl[worse] * 1.005, (better, worse, ppl)
        assert kl[better] < kl[worse], (better, worse, kl)
    assert abs(ppl["f16"] - ref_ppl) / ref_ppl < 1e-3
    assert kl["q4_k_m+imatrix"] <= kl["q4_k_m"] * 1.02 and ppl["q4_k_m+imatrix"] <= ppl["q4_k_m"] * 1.002


def test_transformers_loads_f16(files, reference, eval_windows):
    from transformers import AutoModelForCausalLM

    model, _ = reference
    path = files["f16"]
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.tensor([eval_windows[0][:256]])
    with torch.inference_mode():
        diff = float((loaded(ids).logits - model(ids).logits).abs().max())
    report(f"gguf f16 loaded by transformers: max |logit diff| {diff:.2e}")
    assert diff < 1e-2


# ---------------------------------------------------------------- the file itself

def _fields(path: Path) -> dict:
    reader = gguf.GGUFReader(path)
    return {f.name: f.contents() for f in reader.fields.values()
            if not f.name.startswith("GGUF.") and f.name not in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores",
                                                                  "tokenizer.ggml.token_type")}, reader


def test_metadata_layout_and_provenance(files, tiny_model):
    fields, reader = _fields(files["q8_0"])
    expect = {
        "general.architecture": "llama", "general.type": "model", "general.file_type": 7,
        "general.quantization_version": 2, "llama.block_count": 4, "llama.context_length": 512,
        "llama.embedding_length": 256, "llama.feed_forward_length": 768, "llama.attention.head_count": 8,
        "llama.attention.head_count_kv": 2, "llama.rope.dimension_count": 32, "llama.rope.freq_base": 10000.0,
        "llama.vocab_size": 2000, "tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": False,
    }
    for key, value in expect.items():
        assert fields[key] == pytest.approx(value), key
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["token_embd.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"
    assert len(reader.tensors) == 4 * 9 + 3
    token_types = reader.get_field("tokenizer.ggml.token_type").contents()
    assert token_types[:3] == [2, 3, 3] and token_types.count(6) == 256  # unk, bos, eos; 256 byte tokens
    # provenance: options, and the source digest the manifest's input hashes give
    manifest = read_manifest(files["q8_0"])
    assert manifest and manifest["command"] == "gguf" and manifest["outputs"][0]["path"] == files["q8_0"].name
    assert manifest["outputs"][0]["sha256"] == sha256_file(files["q8_0"])  # hashed while it was written
    from xquant.gguf.metadata import source_digest

    assert fields["xquant.source_sha256"] == source_digest(manifest["inputs"])
    assert json.loads(fields["xquant.options"])["outtype"] == "q8_0"
    # llama.cpp's quantizer keeps our keys and records the importance matrix
    fields, reader = _fields(files["q4_k_m+imatrix"])
    assert fields["general.file_type"] == 15 and fields["quantize.imatrix.chunks_count"] == 16
    assert fields["xquant.source_sha256"] == source_digest(manifest["inputs"])
    assert {t.tensor_type.name for t in reader.tensors} == {"F32", "Q4_K", "Q6_K"}


def test_rotary_permutation_reversed(files, tiny_model):
    """q/k rows in the file are Meta's interleaved order: HF's permutation applied to them gives HF's tensor."""
    reader = gguf.GGUFReader(files["f32"])
    tensors = {t.name: torch.from_numpy(np.array(t.data)) for t in reader.tensors}
    hf = open_hf_tensors(tiny_model)
    for role, heads in (("q", 8), ("k", 2)):
        got = tensors[f"blk.1.attn_{role}.weight"]
        want = hf.get(f"model.layers.1.self_attn.{role}_proj.weight")
        rows, cols = got.shape
        hf_order = got.reshape(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)
        assert torch.equal(hf_order, want) and not torch.equal(got, want)
    assert torch.equal(tensors["blk.1.attn_v.weight"], hf.get("model.layers.1.self_attn.v_proj.weight"))


def test_float16_source_is_copied_exactly(tiny_model, tmp_path):
    """An f16 GGUF of a float16 checkpoint holds the source's bytes (copied by the kernel where no
    permutation applies), q/k permuted, norms in F32."""
    from xquant.gguf.writer import reverse_rotary_permutation

    src = tmp_path / "fp16"
    shutil.copytree(tiny_model, src, ignore=shutil.ignore_patterns("*.safetensors"))
    hf = open_hf_tensors(tiny_model)
    write_safetensors(src, {n: hf.get(n).half() for n in hf.names()})
    path = convert_gguf(src, tmp_path / "fp16.gguf", "f16").paths[0]
    plan = plan_gguf(src, tmp_path / "unused.gguf", "f16")
    by_name = {t.name: torch.from_numpy(np.array(t.data)) for t in gguf.GGUFReader(path).tensors}
    for t in plan.tensors:
        want = hf.get(t.source).half()
        if t.permute_heads:
            want = reverse_rotary_permutation(want, t.permute_heads)
        got = by_name[t.name]
        assert torch.equal(got, want.float() if got.dtype == torch.float32 else want), t.name


def test_imatrix_file_roundtrip(files, tiny_model, tmp_path):
    """The saved importance matrix is llama.cpp's GGUF imatrix format, and quantizing with it gives
    the same tensors as computing it again."""
    from xquant.gguf.imatrix import Imatrix

    fields, reader = _fields(files["imatrix"])
    assert fields["general.type"] == "imatrix" and fields["imatrix.chunk_count"] == 16
    assert fields["imatrix.chunk_size"] == 512 and fields["imatrix.datasets"] == ["mixed"]
    names = {t.name for t in reader.tensors}
    assert "blk.0.attn_q.weight.in_sum2" in names and "blk.3.ffn_down.weight.counts" in names
    matrix = Imatrix.load(files["imatrix"])
    assert len(matrix.entries) == 4 * 7 + 1  # seven linears per layer + output
    sums, count = matrix.entries["blk.0.ffn_down.weight"]
    assert sums.shape == (768,) and count == 16 * 512 and (sums > 0).all()
    out = convert_gguf(tiny_model, tmp_path / "again.gguf", "q4_k_m", imatrix=files["imatrix"]).paths[0]
    a, b = gguf.GGUFReader(out), gguf.GGUFReader(files["q4_k_m+imatrix"])
    for x, y in zip(a.tensors, b.tensors):
        assert x.name == y.name and np.array_equal(np.asarray(x.data), np.asarray(y.data)), x.name


def test_streamed_imatrix_equals_whole_model_hooks(tiny_model, reference):
    """The layer-by-layer walk sees the same activations as hooks on the whole transformers model."""
    from xquant.gguf.imatrix import calibration_chunks, compute_imatrix

    model, tok = reference
    plan = plan_gguf(tiny_model, tiny_model.parent / "unused.gguf", "q4_k_m", "mixed", imatrix_chunks=3)
    streamed = compute_imatrix(plan, threads=1)
    names = {t.source: t.name for t in plan.tensors if len(t.shape) == 2 and t.name != "token_embd.weight"}
    whole: dict[str, torch.Tensor] = {}

    def hook(name):
        return lambda mod, args: whole.__setitem__(
            name, whole.get(name, 0) + (args[0].double() ** 2).reshape(-1, args[0].shape[-1]).sum(0))

    hooks = [m.register_forward_pre_hook(hook(names[n + ".weight"])) for n, m in model.named_modules()
             if n + ".weight" in names]
    try:
        with torch.inference_mode():
            for chunk in calibration_chunks(tok, "mixed", 512, 3):
                model(torch.tensor([chunk]))
    finally:
        for h in hooks:
            h.remove()
    assert set(whole) == set(streamed.entries) and len(whole) == 29
    for name, ref in whole.items():
        sums, count = streamed.entries[name]
        assert count == 3 * 512
        np.testing.assert_allclose(sums, ref.numpy(), rtol=1e-5)


def test_split_output_loads_and_matches(files, tiny_model, tmp_path, eval_windows):
    for kind in ("f32", "q4_k_m"):
        result = convert_gguf(tiny_model, tmp_path / f"split-{kind}.gguf", kind, split_max_size="5MB")
        names = [p.name for p in result.paths]
        assert len(names) >= 2 and names[0] == f"split-{kind}-00001-of-{len(names):05d}.gguf", names
        assert not (tmp_path / f"split-{kind}.gguf").exists()
        for p in result.paths:  # each shard's manifest hash, made while writing (f32) or after (q4_k_m)
            assert read_manifest(p)["outputs"][0]["sha256"] == sha256_file(p), p.name
        ids = eval_windows[0][:128]
        llm_split, llm_one = load_llama(result.paths[0], **THREADS), load_llama(files[kind], **THREADS)
        try:
            assert torch.equal(_llama_logits(llm_split, ids), _llama_logits(llm_one, ids)), kind
        finally:
            llm_split.close()
            llm_one.close()
        assert all((tmp_path / f"{n}.{MANIFEST_NAME}").exists() for n in names)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert not leftovers, leftovers


def test_llama_cpp_enforces_the_imatrix_rule(files, tmp_path):
    """outtypes' needs_imatrix is exactly what llama.cpp's quantizer refuses without a matrix."""
    from xquant.errors import OutputError
    from xquant.gguf import kquant, outtypes

    for name in outtypes.known():
        otype = outtypes.get(name)
        if not otype.by_llama_cpp:
            continue
        target = tmp_path / f"{name}.gguf"
        if otype.needs_imatrix:
            with pytest.raises(OutputError, match="imatrix|importance matrix"):
                kquant.quantize(files["f16"], target, otype)
        else:
            kquant.quantize(files["f16"], target, otype)
            assert gguf.GGUFReader(target).get_field("general.file_type").contents() == int(otype.ftype)
        target.unlink(missing_ok=True)


# ---------------------------------------------------------------- expanded vocabulary

@pytest.fixture(scope="module")
def expanded_model(tiny_model, tmp_path_factory) -> Path:
    """The tiny model with an expanded vocabulary, laid out like Ziya / Colossal releases: the
    SentencePiece model, two added tokens (one user-defined, one special) and embeddings padded to
    a vocab_size of 2048 (46 rows nobody uses)."""
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("expanded")
    shutil.copy(tiny_model / "tokenizer.model", d)
    added = {"2000": {"content": "<sep>", "special": False}, "2001": {"content": "<|im_end|>", "special": True}}
    config = {**tiny.TOKENIZER_CONFIG, "legacy": True,
              "added_tokens_decoder": {k: {**v, "lstrip": False, "rstrip": False, "normalized": False,
                                           "single_word": False} for k, v in added.items()}}
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    AutoTokenizer.from_pretrained(d).save_pretrained(d)  # tokenizer.json, as a release ships it
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    cfg = json.loads((tiny_model / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "vocab_size": 2048}))
    reader, g = open_hf_tensors(tiny_model), torch.Generator().manual_seed(0)
    tensors = {}
    for name in reader.names():
        t = reader.get(name)
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            t = torch.cat([t, torch.randn(48, t.shape[1], generator=g) * 0.02])
        tensors[name] = t
    write_safetensors(d, tensors)
    return d


def test_expanded_vocabulary(expanded_model, tmp_path):
    from sentencepiece import SentencePieceProcessor
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = convert_gguf(expanded_model, tmp_path / "expanded.gguf", "f32").paths[0]
    reader = gguf.GGUFReader(path)
    tokens = reader.get_field("tokenizer.ggml.tokens").contents()
    types = reader.get_field("tokenizer.ggml.token_type").contents()
    scores = reader.get_field("tokenizer.ggml.scores").contents()
    assert len(tokens) == 2048 and tokens[2000:2003] == ["<sep>", "<|im_end|>", "[PAD2002]"]
    assert types[2000:2003] == [4, 3, 5] and scores[2000] == -1000.0 and scores[2047] == -10000.0
    tok = AutoTokenizer.from_pretrained(expanded_model)
    model = AutoModelForCausalLM.from_pretrained(expanded_model, dtype=torch.float32).eval()
    llm = load_llama(path, f32_cache=True, **THREADS)
    try:
        for name in ("zh", "en", "code"):
            doc = load_set(name, "eval").documents[0]
            ids = llm.tokenize(doc.encode(), add_bos=True, special=True)
            assert ids == tok(doc)["input_ids"], name
            with torch.inference_mode():
                ref = model(torch.tensor([ids[:256]])).logits[0].double()
            assert float((_llama_logits(llm, ids[:256]) - ref).abs().max()) < 1e-3
        # Added tokens are single ids, text between them is SentencePiece's (a space prefix after
        # each special piece, as the sentencepiece library and HF's legacy mode do).
        sp = SentencePieceProcessor(model_file=str(expanded_model / "tokenizer.model"))
        text = "数据<sep>hello world<|im_end|>\nnext"
        want = [1, *sp.encode("数据"), 2000, *sp.encode("hello world"), 2001, *sp.encode("\nnext")]
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == want
    finally:
        llm.close()


@pytest.fixture(scope="module")
def bpe_model(tiny_model, tmp_path_factory) -> Path:
    """The tiny model's weights with a byte-level BPE tokenizer.json (GPT-2 pre-tokenizer) of the
    same size trained on the same corpus: a tokenizer-only fixture (its logits mean nothing)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("bpe") / "model"
    shutil.copytree(tiny_model, d, ignore=shutil.ignore_patterns("tokenizer*"))
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    tk.train_from_iterator(tiny.corpus_lines(), trainers.BpeTrainer(
        vocab_size=2000, special_tokens=["<|endoftext|>", "<|im_end|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|endoftext|>", eos_token="<|endoftext|>").save_pretrained(d)
    return d


def test_bpe_vocabulary(bpe_model, tmp_path):
    from transformers import AutoTokenizer

    path = convert_gguf(bpe_model, tmp_path / "bpe.gguf", "f16").paths[0]
    fields, _ = _fields(path)
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.ggml.bos_token_id"] == 0 and len(fields["tokenizer.ggml.merges"]) > 1000
    tok = AutoTokenizer.from_pretrained(bpe_model)
    llm = load_llama(path, vocab_only=True)
    try:
        for name in ("zh", "en", "code"):
            for doc in load_set(name, "eval").documents:
                assert llm.tokenize(doc.encode(), add_bos=False, special=False) == \
                    tok(doc, add_special_tokens=False)["input_ids"], name
        text = "<|im_end|>hi there<|endoftext|>"
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok(text, add_special_tokens=False)["input_ids"]
    finally:
        llm.close()


# ---------------------------------------------------------------- CLI and bad input

def test_cli_dry_run_and_inspect(tiny_model, files, tmp_path):
    out = tmp_path / "plan.gguf"
    proc = run_cli("gguf", tiny_model, out, "--outtype", "q4_k_m", "--dry-run", "--json", check=True)
    plan = json.loads(proc.stdout)
    assert plan["summary"]["tensors"] == 39 and not out.exists()
    assert {r["type"] for r in plan["tensors"]} == {"F32"}  # the stage llama.cpp quantizes from
    info = json.loads(run_cli("inspect", files["q4_k_m"], "--json", check=True).stdout)
    assert info["architecture"] == "llama" and info["file_type"] == "MOSTLY_Q4_K_M"
    assert info["heads"] == 8 and info["kv_heads"] == 2 and info["vocabulary"]["tokens"] == 2000
    assert info["xquant"]["options"]["outtype"] == "q4_k_m" and info["parameters"] == 4_040_960


def test_bad_input_one_line_errors(tiny_model, tmp_path):
    out = tmp_path / "out.gguf"
    m = copy_model(tiny_model, tmp_path / "mistral")
    cfg = json.loads((m / "config.json").read_text())
    (m / "config.json").write_text(json.dumps({**cfg, "architectures": ["MistralForCausalLM"]}))
    assert_one_line_error(run_cli("gguf", m, out), "unsupported architecture MistralForCausalLM", "LlamaForCausalLM")

    m = copy_model(tiny_model, tmp_path / "notok")
    (m / "tokenizer.model").unlink()
    (m / "tokenizer.json").unlink()
    assert_one_line_error(run_cli("gguf", m, out), "tokenizer files missing")

    m = copy_model(tiny_model, tmp_path / "small")
    (m / "config.json").write_text(json.dumps({**cfg, "vocab_size": 1990}))
    # config.json disagrees with the embedding: the one config check of every command says so
    assert_one_line_error(run_cli("gguf", m, out), "vocab_size 1990", "model.embed_tokens.weight")

    assert_one_line_error(run_cli("gguf", tiny_model, out, "--outtype", "iq2_xxs"), "iq2_xxs needs an importance matrix")
    assert_one_line_error(run_cli("gguf", tiny_model, out, "--outtype", "q8_0", "--calibration", "en"),
                          "q8_0 does not use an importance matrix")
    assert_one_line_error(run_cli("gguf", tiny_model, out, "--outtype", "q3_k_xl"), "unknown GGUF type", "q4_k_m")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*"))


def test_missing_llama_cpp_names_the_extra(tiny_model, tmp_path):
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "llama_cpp.py").write_text("raise ImportError('blocked for the test')\n")
    out = tmp_path / "out.gguf"
    proc = run_cli("gguf", tiny_model, out, "--outtype", "q4_k_m",
                   env={"PYTHONPATH": os.pathsep.join([str(blocker), str(REPO)])})
    assert_one_line_error(proc, "llama-cpp-python", "xquant[llamacpp]")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".out*"))


def _small_filesystem(path: Path, size_kib: int) -> str | None:
    """Mount a small tmpfs at path ('tmpfs'), or None where mounting is not permitted."""
    path.mkdir()
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(path)], capture_output=True)
    return "tmpfs" if ok.returncode == 0 else None


@pytest.mark.parametrize("outtype,size_kib", [("f32", 6 << 10), ("q4_k_m", 17 << 10)])
def test_full_disk_leaves_nothing(tiny_model, tmp_path, outtype, size_kib):
    """A one-line disk-full error and no partial file. f32 (16 MB) fails in xquant's writer; for
    q4_k_m the 16 MB stage fits and llama.cpp's quantizer runs out of space. Without permission to
    mount, a 6 MB file-size limit (RLIMIT_FSIZE, EFBIG) stands in for the disk."""
    where = tmp_path / "small"
    kind = _small_filesystem(where, size_kib)
    try:
        out = where / "tiny.gguf"
        if kind is None:
            code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
                    "resource.setrlimit(resource.RLIMIT_FSIZE, (6 << 20, 6 << 20)); "
                    "from xquant.cli import main; sys.argv = ['xquant'] + sys.argv[1:]; main()")
            proc = subprocess.run([sys.executable, "-c", code, "gguf", str(tiny_model), str(out), "--outtype", outtype],
                                  capture_output=True, text=True, env={**os.environ, "XQUANT_QUIET": "1"}, cwd=REPO)
        else:
            proc = run_cli("gguf", tiny_model, out, "--outtype", outtype)
        assert_one_line_error(proc, "disk full")
        assert proc.returncode == 4
        assert not any(where.iterdir()), list(where.iterdir())
    finally:
        if kind == "tmpfs":
            subprocess.run(["umount", str(where)], check=True)
