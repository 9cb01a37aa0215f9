"""Importance matrices for the tiny mixture-of-experts model (`Qwen2MoeForCausalLM`, llama.cpp's
qwen2moe): per-expert sums over only the tokens routed to each expert, saved in llama.cpp's GGUF
imatrix layout, read back, and used by llama.cpp's quantizer for the stacked expert tensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_one_line_error, report, run_cli
from helpers import llama_cpp_logits

pytest.importorskip("llama_cpp", reason="the llamacpp extra (llama-cpp-python) is not installed")
gguf = pytest.importorskip("gguf")

from xquant.gguf import convert_gguf, plan_gguf  # noqa: E402
from xquant.gguf.imatrix import Imatrix, calibration_chunks, compute_imatrix  # noqa: E402

CHUNKS = 8
EXPERTS, TOP_K, LAYERS = 8, 2, 2  # the tiny MoE's MoESpec
ROLES = ("gate", "up", "down")


@pytest.fixture(scope="module")
def files(moe, tmp_path_factory) -> dict[str, Path]:
    """q4_k_m without and with an importance matrix computed from the 'mixed' calibration set."""
    root = tmp_path_factory.mktemp("moe-imatrix")
    plain = convert_gguf(moe, root / "plain.gguf", "q4_k_m", threads=1).paths[0]
    made = convert_gguf(moe, root / "imatrix.gguf", "q4_k_m", "mixed", imatrix_chunks=CHUNKS,
                        save_imatrix=root / "moe.imatrix.gguf", threads=1)
    assert made.imatrix_entries == LAYERS * 12 + 1
    return {"plain": plain, "imatrix": made.paths[0], "matrix": root / "moe.imatrix.gguf"}


def _tensors(path: Path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def test_imatrix_file_has_one_row_per_expert(files):
    """llama-imatrix's layout: in_sum2 ne = [columns, experts], counts ne = [1, experts] for the
    stacked experts; [columns, 1] and [1, 1] for every other weight."""
    t = _tensors(files["matrix"])
    for i in range(LAYERS):
        for role in ROLES:
            name = f"blk.{i}.ffn_{role}_exps.weight"
            assert [int(d) for d in t[name + ".in_sum2"].shape] == [256, EXPERTS]
            assert [int(d) for d in t[name + ".counts"].shape] == [1, EXPERTS]
        assert [int(d) for d in t[f"blk.{i}.ffn_down_shexp.weight.in_sum2"].shape] == [512, 1]
        assert [int(d) for d in t[f"blk.{i}.attn_q.weight.counts"].shape] == [1, 1]
    matrix = Imatrix.load(files["matrix"])
    assert matrix.expert_entries() == LAYERS * 3 and matrix.chunk_count == CHUNKS
    tokens = CHUNKS * 512
    for i in range(LAYERS):
        counts = [matrix.entries[f"blk.{i}.ffn_{role}_exps.weight"][1] for role in ROLES]
        assert all(np.array_equal(c, counts[0]) for c in counts)  # gate, up and down see the same tokens
        assert counts[0].sum() == tokens * TOP_K  # every token goes to top-k experts
        sums = matrix.entries[f"blk.{i}.ffn_gate_exps.weight"][0]
        assert ((sums.sum(axis=1) > 0) == (counts[0] > 0)).all()  # an expert with no token has no sums
        assert matrix.entries[f"blk.{i}.ffn_gate_shexp.weight"][1] == tokens  # the shared expert sees all
    report(f"MoE imatrix ({CHUNKS} chunks of 512): tokens per expert, layer 0: "
           f"{matrix.entries['blk.0.ffn_up_exps.weight'][1].tolist()}, layer 1: "
           f"{matrix.entries['blk.1.ffn_up_exps.weight'][1].tolist()}")


def test_expert_sums_equal_a_whole_model_recount(moe):
    """The layer-by-layer walk gives, per expert, the squared inputs of exactly the tokens the
    router sends there: recounted here from the whole transformers model's post-attention norm
    outputs, routed with the checkpoint's router weights (softmax, top-k) and the per-expert
    checkpoint weights for the down projection's input."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    plan = plan_gguf(moe, moe.parent / "unused.gguf", "q4_k_m", "mixed", imatrix_chunks=2)
    streamed = compute_imatrix(plan, threads=1).entries
    weights = load_file(moe / "model.safetensors")
    model = AutoModelForCausalLM.from_pretrained(moe, dtype=torch.float32).eval()
    normed: dict[int, list[torch.Tensor]] = {i: [] for i in range(LAYERS)}
    hooks = [model.model.layers[i].post_attention_layernorm.register_forward_hook(
        lambda mod, args, out, i=i: normed[i].append(out.reshape(-1, out.shape[-1]))) for i in range(LAYERS)]
    try:
        with torch.inference_mode():
            for chunk in calibration_chunks(AutoTokenizer.from_pretrained(moe), "mixed", 512, 2):
                model(torch.tensor([chunk]))
    finally:
        for h in hooks:
            h.remove()
    for i in range(LAYERS):
        x = torch.cat(normed[i])
        chosen = torch.topk(torch.softmax(x @ weights[f"model.layers.{i}.mlp.gate.weight"].T, -1), TOP_K).indices
        for e in range(EXPERTS):
            xe = x[(chosen == e).any(-1)].double()
            w = {r: weights[f"model.layers.{i}.mlp.experts.{e}.{r}_proj.weight"].double() for r in ROLES}
            down_in = torch.nn.functional.silu(xe @ w["gate"].T) * (xe @ w["up"].T)
            for role, inp in (("gate", xe), ("up", xe), ("down", down_in)):
                sums, counts = streamed[f"blk.{i}.ffn_{role}_exps.weight"]
                assert counts[e] == xe.shape[0], (i, e, role)
                np.testing.assert_allclose(sums[e], (inp ** 2).sum(0).numpy(), rtol=1e-4, atol=1e-9)


def test_quantizer_uses_the_imatrix_for_the_experts(files, moe):
    """llama.cpp quantizes each expert with its own row of the matrix: the stacked expert tensors
    of experts that received tokens change; the file loads and predicts at least as well."""
    from transformers import AutoModelForCausalLM

    from xquant.demo import tiny
    from xquant.calib import load_set

    plain, weighted = _tensors(files["plain"]), _tensors(files["imatrix"])
    matrix = Imatrix.load(files["matrix"])
    for i in range(LAYERS):
        for role in ROLES:
            name = f"blk.{i}.ffn_{role}_exps.weight"
            a, b = np.asarray(plain[name].data), np.asarray(weighted[name].data)
            assert a.shape == b.shape and a.shape[0] == EXPERTS
            assert plain[name].tensor_type == weighted[name].tensor_type
            for e in np.flatnonzero(matrix.entries[name][1]):
                assert not np.array_equal(a[e], b[e]), (name, e)  # each routed-to expert re-weighted
    fields = gguf.GGUFReader(files["imatrix"]).fields
    assert int(fields["quantize.imatrix.entries_count"].contents()) == len(matrix.entries)

    tok = tiny.load_tokenizer(moe)
    ids = [t for doc in load_set("mixed", "eval").documents for t in tok(doc)["input_ids"]][:512]
    model = AutoModelForCausalLM.from_pretrained(moe, dtype=torch.float32)
    with torch.inference_mode():
        ref = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    kl = {}
    for kind in ("plain", "imatrix"):
        got = torch.log_softmax(llama_cpp_logits(files[kind], ids), -1)
        kl[kind] = float((ref.exp() * (ref - got)).sum(-1).mean())
    report(f"MoE q4_k_m vs transformers ({len(ids)} eval tokens): mean KL {kl['plain']:.3e} without, "
           f"{kl['imatrix']:.3e} with the importance matrix ({CHUNKS} chunks)")
    assert kl["imatrix"] <= kl["plain"] * 1.02 and kl["imatrix"] < 0.02


def test_saved_imatrix_file_reproduces_the_quantization(files, moe, tmp_path):
    """Reading the saved file back (--imatrix) gives the same tensors as computing it."""
    out = convert_gguf(moe, tmp_path / "again.gguf", "q4_k_m", imatrix=files["matrix"], threads=1).paths[0]
    a, b = _tensors(out), _tensors(files["imatrix"])
    assert list(a) == list(b)
    for name in a:
        assert np.array_equal(np.asarray(a[name].data), np.asarray(b[name].data)), name


def test_inspect_summarises_the_imatrix_file(files):
    info = json.loads(run_cli("inspect", files["matrix"], "--json", check=True).stdout)
    summary = info["importance_matrix"]
    assert summary["entries"] == LAYERS * 12 + 1 and summary["expert_entries"] == LAYERS * 3
    assert summary["experts_per_entry"] == [EXPERTS] and summary["chunks"] == CHUNKS
    matrix = Imatrix.load(files["matrix"])
    assert summary["expert_matrices_without_tokens"] == sum(
        int((c == 0).sum()) for s, c in matrix.entries.values() if s.ndim == 2)


def test_imatrix_without_expert_rows_is_refused(files, moe, tmp_path):
    """One row of sums for a stacked experts weight (and a count per expert that does not match)
    is named in one line, before anything is written."""
    matrix = Imatrix.load(files["matrix"])
    sums, counts = matrix.entries["blk.1.ffn_down_exps.weight"]
    matrix.entries["blk.1.ffn_down_exps.weight"] = (sums[:3], counts[:3])
    bad = tmp_path / "bad.imatrix.gguf"
    matrix.save(bad)
    proc = run_cli("gguf", moe, tmp_path / "out.gguf", "--outtype", "q4_k_m", "--imatrix", bad)
    assert_one_line_error(proc, "blk.1.ffn_down_exps.weight", "3 experts", "8 experts")
    assert not (tmp_path / "out.gguf").exists()
    # An older file's single count for all experts: broadcast, as llama.cpp does.
    old = Imatrix.load(files["matrix"])
    s, c = old.entries["blk.0.ffn_up_exps.weight"]
    old.entries["blk.0.ffn_up_exps.weight"] = (s.reshape(-1), int(c.max()))
    old.save(tmp_path / "old.imatrix.gguf")
    again = Imatrix.load(tmp_path / "old.imatrix.gguf")
    again.check(plan_gguf(moe, tmp_path / "x.gguf", "q4_k_m", imatrix=tmp_path / "old.imatrix.gguf"))
    s2, c2 = again.entries["blk.0.ffn_up_exps.weight"]
    assert s2.shape == (EXPERTS, 256) and c2.tolist() == [int(c.max())] * EXPERTS
