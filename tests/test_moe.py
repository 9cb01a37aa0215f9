"""Mixture of experts with a shared expert (tiny trained `Qwen2MoeForCausalLM`) through int8/NF4,
GGUF and the report.

int8/NF4 must equal transformers + bitsandbytes' in-memory route: transformers 5 fuses the routed
experts into 3-D parameters and the router is a plain parameter, so bitsandbytes (which replaces
nn.Linear only) leaves both unquantized; attention, the shared expert and its gate are quantized.
GGUF is llama.cpp's `qwen2moe` (stacked expert tensors, shared-expert tensors, expert metadata),
checked in llama.cpp against transformers' logits. Configs llama.cpp's graph cannot run fail in
one line.
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
from xquant.evaluate.runtimes import nf4_cpu_fallback

MODES = {
    "int8": dict(load_in_8bit=True),
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
}


@pytest.fixture(scope="module")
def ids(moe) -> list[int]:
    from xquant.demo import tiny
    from xquant.calib import load_set

    tok = tiny.load_tokenizer(moe)
    return tok(load_set("mixed", "eval").documents[0])["input_ids"][:256]


@pytest.fixture(scope="module")
def reference(moe, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(moe, dtype=torch.float32)
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].double()


@pytest.fixture(scope="module")
def bnb(moe, ids, tmp_path_factory):
    """mode -> (xquant's dir, transformers' saved dir, transformers' in-memory logits)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    root = tmp_path_factory.mktemp("moe-bnb")
    out = {}
    for mode, args in MODES.items():
        model = AutoModelForCausalLM.from_pretrained(moe, device_map="cpu",
                                                     quantization_config=BitsAndBytesConfig(**args))
        model.save_pretrained(root / f"{mode}-transformers")
        with torch.inference_mode():
            logits = nf4_cpu_fallback(model)(torch.tensor([ids[:32]])).logits[0]
        del model
        run_cli(mode, moe, root / f"{mode}-xquant", check=True)
        out[mode] = (root / f"{mode}-xquant", root / f"{mode}-transformers", logits)
    return out


@pytest.fixture(scope="module")
def gguf_files(moe, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe-gguf")
    out = {}
    for outtype in ("f32", "q8_0", "q4_k_m"):  # written directly (f32, q8_0) and by llama.cpp's quantizer
        out[outtype] = root / f"moe-{outtype}.gguf"
        run_cli("gguf", moe, out[outtype], "--outtype", outtype, check=True)
    return out


@pytest.mark.parametrize("mode", list(MODES))
def test_int8_nf4_equal_transformers_with_experts_unquantized(bnb, moe, ids, mode):
    from transformers import AutoModelForCausalLM

    ours, theirs, in_memory = bnb[mode]
    a, b = load_file(ours / "model.safetensors"), load_file(theirs / "model.safetensors")
    assert sorted(a) == sorted(b)
    for name in b:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert torch.equal(a[name], b[name]), name
    assert (json.loads((ours / "config.json").read_text())["quantization_config"]
            == json.loads((theirs / "config.json").read_text())["quantization_config"])
    # Routed experts and the router: kept as the source's float32, per expert, as transformers saves.
    source = load_file(moe / "model.safetensors")
    kept = [n for n in source if ".mlp.experts." in n or n.endswith(".mlp.gate.weight")]
    assert len(kept) == 2 * (8 * 3 + 1)
    assert all(a[n].dtype == torch.float32 and torch.equal(a[n], source[n]) for n in kept)
    marker = ".SCB" if mode == "int8" else ".weight.quant_map"
    quantized = sorted(n.removesuffix(marker) for n in a if n.endswith(marker))
    assert len(quantized) == 2 * 8  # q k v o + shared gate/up/down + shared-expert gate, per layer
    assert "model.layers.1.mlp.shared_expert_gate" in quantized
    model = nf4_cpu_fallback(AutoModelForCausalLM.from_pretrained(ours))  # no quantization_config
    assert type(model.model.layers[0].mlp.shared_expert.down_proj).__name__ in ("Linear8bitLt", "Linear4bit")
    assert model.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.float32
    with torch.inference_mode():
        assert torch.equal(model(torch.tensor([ids[:32]])).logits[0], in_memory)


def test_gguf_is_qwen2moe_with_stacked_experts(gguf_files, moe):
    from gguf import GGUFReader

    r = GGUFReader(gguf_files["f32"])
    kv = {f.name: f.parts[f.data[0]][0] for f in r.fields.values() if len(f.data) == 1 and f.types
          and f.types[0].name.startswith(("UINT", "INT", "FLOAT"))}
    assert bytes(r.fields["general.architecture"].parts[-1]).decode() == "qwen2moe"
    assert {k: int(kv[f"qwen2moe.{k}"]) for k in ("expert_count", "expert_used_count", "expert_feed_forward_length",
                                                   "expert_shared_feed_forward_length", "block_count")} == {
        "expert_count": 8, "expert_used_count": 2, "expert_feed_forward_length": 256,
        "expert_shared_feed_forward_length": 512, "block_count": 2}
    tensors = {t.name: t for t in r.tensors}
    source = load_file(moe / "model.safetensors")
    for role in ("gate", "up", "down"):
        t = tensors[f"blk.1.ffn_{role}_exps.weight"]
        stacked = torch.stack([source[f"model.layers.1.mlp.experts.{e}.{role}_proj.weight"] for e in range(8)])
        assert torch.equal(torch.from_numpy(np.array(t.data)).reshape(stacked.shape), stacked)
    assert tensors["blk.0.ffn_gate_inp_shexp.weight"].tensor_type.name == "F32"
    assert {"blk.0.ffn_up_shexp.weight", "blk.0.ffn_gate_inp.weight", "blk.0.attn_q.bias"} <= set(tensors)
    for outtype, qtype in (("q8_0", "Q8_0"), ("q4_k_m", "Q4_K")):
        types = {t.name: t.tensor_type.name for t in GGUFReader(gguf_files[outtype]).tensors}
        assert types["blk.0.ffn_gate_exps.weight"] == qtype and types["blk.0.ffn_gate_inp.weight"] == "F32"


def test_gguf_logits_in_llama_cpp_match_transformers(gguf_files, reference, ids):
    f32 = float((llama_cpp_logits(gguf_files["f32"], ids) - reference).abs().max())
    p = torch.log_softmax(reference, -1)
    kl = {}
    for outtype in ("q8_0", "q4_k_m"):
        logits = llama_cpp_logits(gguf_files[outtype], ids)
        kl[outtype] = float((p.exp() * (p - torch.log_softmax(logits, -1))).sum(-1).mean())
    report(f"MoE GGUF in llama.cpp vs transformers ({len(ids)} tokens): f32 max |logit diff| {f32:.2e}; "
           f"mean KL q8_0 {kl['q8_0']:.2e}, q4_k_m {kl['q4_k_m']:.2e}")
    assert f32 < 1e-3
    assert kl["q8_0"] < 1e-3 and kl["q4_k_m"] < 0.02


def test_gguf_refuses_what_llama_cpp_cannot_run(moe, tmp_path):
    for i, (key, value) in enumerate([("norm_topk_prob", True), ("decoder_sparse_step", 2)]):
        src = tmp_path / f"variant{i}"
        src.mkdir()
        for f in moe.iterdir():
            (src / f.name).symlink_to(f)
        config = json.loads((moe / "config.json").read_text()) | {key: value}
        (src / "config.json").unlink()
        (src / "config.json").write_text(json.dumps(config))
        proc = run_cli("gguf", src, tmp_path / f"v{i}.gguf")
        assert_one_line_error(proc, "not supported by llama.cpp", "qwen2moe", key)
        assert not (tmp_path / f"v{i}.gguf").exists()


def test_report_covers_the_moe_artifacts(moe, bnb, gguf_files, tmp_path):
    from xquant.report import build_report

    arts = [bnb["int8"][0], bnb["nf4"][0], gguf_files["f32"]]
    result = build_report(moe, arts, tmp_path / "report", ["en"], [], max_tokens=256, window=256)
    rows = {r["name"]: r for r in result["artifacts"]}
    assert not [r for r in rows.values() if "error" in r], rows
    ref = rows[moe.name]
    assert rows["moe-f32.gguf"]["kind"] == "gguf" and rows["nf4-xquant"]["kind"] == "nf4"
    en = {name: row["sets"]["en"] for name, row in rows.items()}
    report("MoE report (en, 256 tokens): " + "; ".join(
        f"{name} ppl {r['ppl']:.2f} KL {r.get('kl', float('nan')):.2e}" for name, r in en.items()))
    assert en["moe-f32.gguf"]["kl"] < 1e-3 and en["int8-xquant"]["kl"] < 0.05 and en["nf4-xquant"]["kl"] < 0.2
    assert ref["size_bytes"] > rows["nf4-xquant"]["size_bytes"]
    assert "moe-f32.gguf" in (tmp_path / "report" / "report.md").read_text()
