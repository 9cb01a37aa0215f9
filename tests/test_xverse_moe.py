"""XVERSE-MoE (tiny trained `XverseMoeForCausalLM`, fixtures_xverse_moe.py) end to end: GGUF through
llama.cpp's `deepseek` architecture, int8/NF4, GPTQ with per-expert Hessians, inspect, report and the
dry-run on the real model's shapes.

The reference is xquant's own implementation (xquant/models/xverse_moe.py); it is checked against
the block's math written out here from the checkpoint's tensors, and llama.cpp is checked against
it on the same weights. int8/NF4 equal what transformers + bitsandbytes write for that class.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_one_line_error, report, run_cli
from helpers import llama_cpp_logits

EXPERTS, TOP_K, SHARED, FFN, LAYERS = 8, 3, 2, 256, 2
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # gptqmodel refuses to start on 2 cores without it

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def xmoe() -> Path:
    import fixtures_xverse_moe

    path = fixtures_xverse_moe.xverse_moe_dir()
    built = json.loads((path / "xquant-tiny.json").read_text())
    report(f"tiny XVERSE-MoE {path.name}: {EXPERTS} experts top-{TOP_K} + {SHARED} shared, "
           f"final train loss {built['final_train_loss']:.2f}")
    return path


def _view(src: Path, dst: Path) -> Path:
    """`src` with config.json naming xquant's registered class (what the runtimes load)."""
    from xquant.models import transformers_fields

    dst.mkdir()
    for f in src.iterdir():
        if f.name != "config.json":
            (dst / f.name).symlink_to(f.resolve())
    config = transformers_fields(json.loads((src / "config.json").read_text()))
    config.pop("auto_map", None)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.fixture(scope="module")
def view(xmoe, tmp_path_factory) -> Path:
    return _view(xmoe, tmp_path_factory.mktemp("xmoe-view") / "m")


@pytest.fixture(scope="module")
def fp32(view):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(view, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def ids(xmoe) -> list[int]:
    from xquant.demo import tiny
    from xquant.calib import load_set

    return tiny.load_tokenizer(xmoe)(load_set("mixed", "eval").documents[0])["input_ids"][:256]


@pytest.fixture(scope="module")
def reference(fp32, ids) -> torch.Tensor:
    with torch.inference_mode():
        return fp32(torch.tensor([ids])).logits[0].double()


def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    p = torch.log_softmax(p_logits.double(), -1)
    return float((p.exp() * (p - torch.log_softmax(q_logits.double(), -1))).sum(-1).mean())


# ---------------------------------------------------------------- architecture, reference, inspect


def test_registry_and_inspect(xmoe):
    from xquant.arch import for_config

    assert for_config({"architectures": ["XverseMoeForCausalLM"], "num_experts": 64}).name == "xverse_moe"
    assert for_config({"architectures": ["XverseForCausalLM"], "num_experts": 64}).name == "xverse_moe"
    assert for_config({"architectures": ["XverseForCausalLM"]}).name == "xverse"  # dense XVERSE as before
    info = json.loads(run_cli("inspect", xmoe, "--json", check=True).stdout)
    assert info["xquant_arch"] == "xverse_moe"
    assert (info["experts"], info["experts_per_token"], info["shared_experts"], info["expert_width"]) == (
        EXPERTS, TOP_K, SHARED, FFN)
    assert info["kv_heads"] == 2 and info["heads"] == 8


def test_block_is_the_xverse_math(xmoe, fp32):
    """The registered class's MoE block equals the block written out from the tensors: softmax over
    the router logits, top-k weighted by their probabilities (no renormalisation), plus one shared
    MLP of width intermediate_size x num_shared_experts for every token."""
    w = load_file(xmoe / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 256, generator=g)

    def mlp(prefix, h):
        act = torch.nn.functional.silu(h @ w[f"{prefix}.gate_proj.weight"].T) * (h @ w[f"{prefix}.up_proj.weight"].T)
        return act @ w[f"{prefix}.down_proj.weight"].T

    p = "model.layers.1.mlp"
    assert w[f"{p}.router.weight"].shape == (EXPERTS, 256)
    assert w[f"{p}.shared_experts.gate_proj.weight"].shape == (FFN * SHARED, 256)
    probs = torch.softmax(x @ w[f"{p}.router.weight"].T, -1)
    top, idx = probs.topk(TOP_K, -1)
    want = mlp(f"{p}.shared_experts", x)
    for t in range(x.shape[0]):
        for k in range(TOP_K):
            want[t] += top[t, k] * mlp(f"{p}.experts.{int(idx[t, k])}", x[t:t + 1])[0]
    with torch.inference_mode():
        got = fp32.model.layers[1].mlp(x[None])[0]
    assert torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())
    assert len(set(idx.flatten().tolist())) == EXPERTS  # the router uses every expert on random input


# ---------------------------------------------------------------- GGUF (llama.cpp deepseek)


@pytest.fixture(scope="module")
def gguf_files(xmoe, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("xmoe-gguf")
    out = {}
    for outtype in ("f32", "f16", "q8_0", "q4_k_m"):  # direct (f32, f16, q8_0) and llama.cpp's quantizer
        out[outtype] = root / f"xmoe-{outtype}.gguf"
        run_cli("gguf", xmoe, out[outtype], "--outtype", outtype, check=True)
    out["q4_k_m-imatrix"] = root / "xmoe-q4_k_m-imatrix.gguf"
    out["imatrix"] = root / "xmoe.imatrix.gguf"
    run_cli("gguf", xmoe, out["q4_k_m-imatrix"], "--outtype", "q4_k_m", "--calibration", "mixed",
            "--imatrix-chunks", "4", "--save-imatrix", out["imatrix"], check=True)
    return out


def _kv(path: Path) -> dict:
    from gguf import GGUFReader

    r = GGUFReader(path)
    out = {}
    for f in r.fields.values():
        if len(f.data) == 1 and f.types and f.types[0].name.startswith(("UINT", "INT", "FLOAT", "BOOL")):
            out[f.name] = f.parts[f.data[0]][0].item()
        elif f.types and f.types[0].name == "STRING":
            out[f.name] = bytes(f.parts[-1]).decode()
    return out


def test_gguf_is_deepseek_with_stacked_experts(gguf_files, xmoe):
    from gguf import GGUFReader

    kv = _kv(gguf_files["f32"])
    assert kv["general.architecture"] == "deepseek"
    assert {k: kv[f"deepseek.{k}"] for k in ("expert_count", "expert_used_count", "expert_shared_count",
                                             "expert_feed_forward_length", "leading_dense_block_count",
                                             "block_count", "attention.head_count_kv")} == {
        "expert_count": EXPERTS, "expert_used_count": TOP_K, "expert_shared_count": SHARED,
        "expert_feed_forward_length": FFN, "leading_dense_block_count": 0, "block_count": LAYERS,
        "attention.head_count_kv": 2}
    assert kv["deepseek.expert_weights_scale"] == 1.0
    assert kv["tokenizer.ggml.model"] == "llama"  # XVERSE's SentencePiece-style tokenizer.json
    r = GGUFReader(gguf_files["f32"])
    tensors = {t.name: t for t in r.tensors}
    source = load_file(xmoe / "model.safetensors")
    for role in ("gate", "up", "down"):
        t = tensors[f"blk.1.ffn_{role}_exps.weight"]
        stacked = torch.stack([source[f"model.layers.1.mlp.experts.{e}.{role}_proj.weight"] for e in range(EXPERTS)])
        assert torch.equal(torch.from_numpy(np.array(t.data)).reshape(stacked.shape), stacked)
        shexp = tensors[f"blk.1.ffn_{role}_shexp.weight"]
        assert tuple(reversed(shexp.shape.tolist())) == tuple(source[f"model.layers.1.mlp.shared_experts.{role}_proj.weight"].shape)
    assert "blk.0.ffn_gate_inp_shexp.weight" not in tensors  # no shared-expert gate
    for outtype, qtype in (("f16", "F16"), ("q8_0", "Q8_0"), ("q4_k_m", "Q4_K")):
        types = {t.name: t.tensor_type.name for t in GGUFReader(gguf_files[outtype]).tensors}
        assert types["blk.0.ffn_gate_exps.weight"] == qtype and types["blk.0.ffn_gate_inp.weight"] == "F32"


def test_gguf_tokenizes_like_transformers(gguf_files, xmoe):
    from xquant.demo import tiny
    from xquant.calib import load_set
    from xquant.evaluate.runtimes import GGUFRuntime

    tok = tiny.load_tokenizer(xmoe)
    rt = GGUFRuntime(gguf_files["f32"], n_ctx=512)
    try:
        for name in ("en", "zh", "code"):
            text = load_set(name, "eval").documents[0][:400]
            assert rt.encode(text) == tok(text)["input_ids"], name
    finally:
        rt.close()


def test_gguf_logits_in_llama_cpp_match_the_reference(gguf_files, reference, ids):
    f32 = float((llama_cpp_logits(gguf_files["f32"], ids) - reference).abs().max())
    kl = {t: _kl(reference, llama_cpp_logits(gguf_files[t], ids)) for t in ("f16", "q8_0", "q4_k_m", "q4_k_m-imatrix")}
    report(f"XVERSE-MoE GGUF (deepseek) in llama.cpp vs xquant's forward ({len(ids)} tokens): f32 max |logit diff| "
           f"{f32:.2e}; mean KL " + ", ".join(f"{t} {v:.2e}" for t, v in kl.items()))
    assert f32 < 1e-3
    assert kl["f16"] < 1e-4 and kl["q8_0"] < 1e-3 and kl["q4_k_m"] < 0.02 and kl["q4_k_m-imatrix"] < 0.02


def test_imatrix_has_a_row_per_expert_from_its_routed_tokens(gguf_files, fp32):
    from xquant.gguf.imatrix import Imatrix

    m = Imatrix.load(gguf_files["imatrix"])
    tokens = m.chunk_count * m.chunk_size
    for i in range(LAYERS):
        sums, counts = m.entries[f"blk.{i}.ffn_gate_exps.weight"]
        assert sums.shape == (EXPERTS, 256) and counts.shape == (EXPERTS,)
        assert int(counts.sum()) == tokens * TOP_K  # every token went to top-k experts
        assert np.array_equal(counts, m.entries[f"blk.{i}.ffn_down_exps.weight"][1])
        assert m.entries[f"blk.{i}.ffn_down_exps.weight"][0].shape == (EXPERTS, FFN)
        assert m.entries[f"blk.{i}.ffn_up_shexp.weight"][1] == tokens  # shared experts see every token
    # Layer 0's routing recomputed from the embeddings: the same count per expert.
    from xquant.demo import tiny
    from xquant.gguf.imatrix import calibration_chunks

    tok = tiny.load_tokenizer(Path(fp32.config._name_or_path))
    chunks = calibration_chunks(tok, "mixed", m.chunk_size, m.chunk_count)
    seen = torch.zeros(EXPERTS, dtype=torch.long)
    layer = fp32.model.layers[0]

    def count(mod, args) -> None:  # a pre-hook returning a value would replace the input
        seen.add_(torch.bincount(mod.route(args[0].reshape(-1, 256))[0].flatten(), minlength=EXPERTS))

    hook = layer.mlp.register_forward_pre_hook(count)
    try:
        with torch.inference_mode():
            for c in chunks:
                fp32(torch.tensor([c]))
    finally:
        hook.remove()
    # (xquant's imatrix runs eager attention, the model here sdpa: a near-tie may flip one choice)
    assert np.abs(m.entries["blk.0.ffn_up_exps.weight"][1] - seen.numpy()).sum() <= 2


def test_gguf_refuses_what_llama_cpp_cannot_run(xmoe, tmp_path):
    src = tmp_path / "normed"
    src.mkdir()
    for f in xmoe.iterdir():
        if f.name != "config.json":
            (src / f.name).symlink_to(f)
    (src / "config.json").write_text(json.dumps(json.loads((xmoe / "config.json").read_text()) | {"norm_topk_prob": True}))
    proc = run_cli("gguf", src, tmp_path / "x.gguf")
    assert_one_line_error(proc, "norm_topk_prob = true", "deepseek")
    assert not (tmp_path / "x.gguf").exists()


# ---------------------------------------------------------------- int8 / NF4

MODES = {"int8": dict(load_in_8bit=True), "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4")}


@pytest.fixture(scope="module")
def bnb(xmoe, view, ids, tmp_path_factory):
    """mode -> (xquant's dir, transformers' saved dir, transformers' in-memory logits)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from xquant.evaluate.runtimes import nf4_cpu_fallback

    root = tmp_path_factory.mktemp("xmoe-bnb")
    out = {}
    for mode, args in MODES.items():
        model = AutoModelForCausalLM.from_pretrained(view, device_map="cpu",
                                                     quantization_config=BitsAndBytesConfig(**args))
        model.save_pretrained(root / f"{mode}-transformers")
        with torch.inference_mode():
            logits = nf4_cpu_fallback(model)(torch.tensor([ids[:32]])).logits[0]
        del model
        run_cli(mode, xmoe, root / f"{mode}-xquant", check=True)
        out[mode] = (root / f"{mode}-xquant", root / f"{mode}-transformers", logits)
    return out


@pytest.mark.parametrize("mode", list(MODES))
def test_int8_nf4_equal_transformers_and_evaluate(bnb, xmoe, ids, mode):
    from xquant.evaluate.runtimes import open_runtime

    ours, theirs, in_memory = bnb[mode]
    a, b = load_file(ours / "model.safetensors"), load_file(theirs / "model.safetensors")
    assert sorted(a) == sorted(b)
    for name in b:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    assert (json.loads((ours / "config.json").read_text())["quantization_config"]
            == json.loads((theirs / "config.json").read_text())["quantization_config"])
    source = load_file(xmoe / "model.safetensors")
    routers = [n for n in source if n.endswith(".mlp.router.weight")]
    assert len(routers) == LAYERS and all(a[n].dtype == torch.float32 and torch.equal(a[n], source[n]) for n in routers)
    marker = ".SCB" if mode == "int8" else ".weight.quant_map"
    quantized = {n.removesuffix(marker) for n in a if n.endswith(marker)}
    assert len(quantized) == LAYERS * (4 + 3 + 3 * EXPERTS)  # attention, shared, every routed expert
    assert "model.layers.1.mlp.experts.7.down_proj" in quantized
    assert json.loads((ours / "config.json").read_text())["architectures"] == ["XverseMoeForCausalLM"]
    rt = open_runtime(ours)  # the artifact as it is: config model_type "xverse", remote-code auto_map
    try:
        assert "XverseMoeForCausalLM" in rt.engine and rt.kind == mode
        assert type(rt.model.model.layers[0].mlp.experts[0].gate_proj).__name__ in ("Linear8bitLt", "Linear4bit")
        assert torch.equal(rt.logits(ids[:32]), in_memory.float())
    finally:
        rt.close()


# ---------------------------------------------------------------- GPTQ


@pytest.fixture(scope="module")
def gptq_dirs(xmoe, tmp_path_factory) -> dict[str, Path]:
    from xquant.quant.gptq import GPTQOptions, gptq

    root = tmp_path_factory.mktemp("xmoe-gptq")
    out = {}
    for name, opts in (("4bit", {}), ("4bit-experts-rtn", {"min_expert_tokens": 10**9})):
        gptq(xmoe, root / name, GPTQOptions(bits=4, samples=8, seq_len=256, group_size=128, **opts))
        out[name] = root / name
    return out


def _experts(path: Path) -> dict:
    from xquant.io.output import MANIFEST_NAME

    return json.loads((path / MANIFEST_NAME).read_text())["gptq"]["experts"]


def test_gptq_layout_and_round_to_nearest_count(gptq_dirs, xmoe):
    out = gptq_dirs["4bit"]
    t = load_file(out / "model.safetensors")
    assert "model.layers.1.mlp.experts.7.down_proj.qweight" in t and "model.layers.0.mlp.shared_experts.up_proj.qweight" in t
    assert t["model.layers.0.mlp.router.weight"].is_floating_point()  # the router stays unquantized
    assert not any(n.startswith("model.layers.0.mlp.router.") and n != "model.layers.0.mlp.router.weight" for n in t)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["XverseMoeForCausalLM"] and config["quantization_config"]["quant_method"] == "gptq"
    x = _experts(out)
    assert x["total"] == LAYERS * EXPERTS and x["rtn"] == sum(len(layer["rtn"]) for layer in x["per_layer"])
    for layer in x["per_layer"]:
        assert sum(layer["tokens"]) == 8 * 256 * TOP_K  # each calibration token routed to top-k experts
        assert layer["rtn"] == [e for e, n in enumerate(layer["tokens"]) if n < x["min_tokens"]]
    assert _experts(gptq_dirs["4bit-experts-rtn"])["rtn"] == LAYERS * EXPERTS
    report(f"XVERSE-MoE GPTQ 4-bit g128 (8 x 256 tokens): experts by round-to-nearest {x['rtn']} of {x['total']}")


def test_gptq_beats_round_to_nearest_on_held_out_text(gptq_dirs, xmoe, view, fp32):
    from transformers import AutoModelForCausalLM

    from xquant.demo import tiny
    from xquant.calib import load_set
    from xquant.evaluate.gptq_reference import load_dequantized
    from xquant.quant.gptq import core

    tok = tiny.load_tokenizer(xmoe)
    held_out = tok("\n".join(load_set("mixed", "eval").documents))["input_ids"][:1024]
    x = torch.tensor([held_out[j:j + 256] for j in range(0, 1024, 256)])
    spec = core.QuantSpec(bits=4, group_size=128)
    rtn = AutoModelForCausalLM.from_pretrained(view, dtype=torch.float32).eval()
    for name, module in rtn.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith("model.layers."):
            module.weight.data = core.rtn_quantize(module.weight.data, spec).weight
    models = {"gptq": load_dequantized(_view(gptq_dirs["4bit"], gptq_dirs["4bit"].parent / "v4")),
              "experts RTN": load_dequantized(_view(gptq_dirs["4bit-experts-rtn"], gptq_dirs["4bit"].parent / "vr")),
              "RTN": rtn}
    with torch.inference_mode():
        ref = fp32(x).logits
        kl = {name: _kl(ref.reshape(-1, ref.shape[-1]), m(x).logits.reshape(-1, ref.shape[-1]))
              for name, m in models.items()}
    report("XVERSE-MoE 4-bit g128 mean KL to float32 on 1024 held-out tokens: "
           + ", ".join(f"{k} {v:.2e}" for k, v in kl.items()))
    assert kl["gptq"] < kl["experts RTN"] < kl["RTN"], kl


def test_gptq_loads_in_its_runtime(gptq_dirs, ids, reference):
    from xquant.evaluate.runtimes import open_runtime

    rt = open_runtime(gptq_dirs["4bit"])
    try:
        assert "XverseMoeForCausalLM" in rt.engine
        kl = _kl(reference[:64], rt.logits(ids[:64]))
    finally:
        rt.close()
    assert kl < 0.05, kl


# ---------------------------------------------------------------- report, dry-run


def test_report_lists_every_artifact(xmoe, gguf_files, bnb, gptq_dirs, tmp_path):
    from xquant.report import build_report

    arts = [gguf_files["f32"], gguf_files["q8_0"], gguf_files["q4_k_m"], bnb["int8"][0], bnb["nf4"][0],
            gptq_dirs["4bit"]]
    result = build_report(xmoe, arts, tmp_path / "report", ["en"], [], max_tokens=256, window=256)
    rows = {r["name"]: r for r in result["artifacts"]}
    assert not [r for r in rows.values() if "error" in r], rows
    assert set(rows) == {xmoe.name, *(a.name for a in arts)}
    en = {name: row["sets"]["en"] for name, row in rows.items()}
    report("XVERSE-MoE report (en, 256 tokens): " + "; ".join(
        f"{name} ppl {r['ppl']:.2f} KL {r.get('kl', float('nan')):.2e}" for name, r in en.items()))
    assert en["xmoe-f32.gguf"]["kl"] < 1e-3 and en["int8-xquant"]["kl"] < 0.05 and en["nf4-xquant"]["kl"] < 0.2
    assert en["4bit"]["kl"] < 0.05
    md = (tmp_path / "report" / "report.md").read_text()
    assert all(a.name in md for a in arts)


# The real XVERSE-MoE-A4.2B's shapes (the vocabulary is the tiny one: the GGUF planner checks the
# embedding rows against the tokenizer, and the experts, not the vocabulary, are what is tested).
REAL = dict(num_hidden_layers=28, hidden_size=2560, num_attention_heads=32, num_experts=64, moe_top_k=6,
            num_shared_experts=2, intermediate_size=1728, vocab_size=2000, max_position_embeddings=8192,
            rms_norm_eps=1e-6, rope_theta=500000.0, hidden_act="silu", tie_word_embeddings=False,
            architectures=["XverseForCausalLM"], model_type="xverse", torch_dtype="bfloat16")


def _stand_in(xmoe: Path, out: Path) -> Path:
    """A header-only sparse safetensors file with the real model's tensors (bfloat16), as
    xquant/estimate.py's write_stand_in makes them: the data reads as zeros and takes no disk."""
    from xquant.io.safetensors_file import layout

    H, F, E, L, V = 2560, 1728, 64, 28, 2000
    specs = [("model.embed_tokens.weight", (V, H)), ("model.norm.weight", (H,)), ("lm_head.weight", (V, H))]
    for i in range(L):
        p = f"model.layers.{i}."
        specs += [(p + "input_layernorm.weight", (H,)), (p + "post_attention_layernorm.weight", (H,))]
        specs += [(p + f"self_attn.{n}_proj.weight", (H, H)) for n in "qkvo"]
        specs += [(p + "mlp.router.weight", (E, H))]
        for e in range(E):
            specs += [(p + f"mlp.experts.{e}.gate_proj.weight", (F, H)), (p + f"mlp.experts.{e}.up_proj.weight", (F, H)),
                      (p + f"mlp.experts.{e}.down_proj.weight", (H, F))]
        specs += [(p + "mlp.shared_experts.gate_proj.weight", (2 * F, H)),
                  (p + "mlp.shared_experts.up_proj.weight", (2 * F, H)),
                  (p + "mlp.shared_experts.down_proj.weight", (H, 2 * F))]
    out.mkdir()
    head, _ = layout([(n, s, torch.bfloat16) for n, s in specs], None)
    data = sum(2 * int(np.prod(s)) for _, s in specs)
    with open(out / "model.safetensors", "wb") as f:
        f.write(head)
        f.truncate(len(head) + data)
    (out / "config.json").write_text(json.dumps(REAL))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out / name).symlink_to(xmoe / name)
    return out


def test_dry_run_on_the_real_shapes(xmoe, tmp_path):
    from xquant.gguf.plan import CHUNK_VALUES, plan_gguf
    from xquant.pipeline import BASE_MEMORY
    from xquant.quant.bnb import plan_nf4

    src = _stand_in(xmoe, tmp_path / "xverse-moe-a4.2b")
    H, F, E, L, V = 2560, 1728, 64, 28, 2000
    assert (src / "model.safetensors").stat().st_blocks * 512 < 2**20  # sparse: no data on disk
    info = json.loads(run_cli("inspect", src, "--json", check=True).stdout)
    assert (info["experts"], info["experts_per_token"], info["shared_experts"], info["layers"]) == (64, 6, 2, 28)
    # By hand: per layer 4 attention matrices, 64 experts x 3 matrices, the fused shared MLP
    # (3 x 2F x H), the router and two norms; plus embedding, output and final norm.
    per_layer_matrices = 4 * H * H + E * 3 * F * H + 3 * 2 * F * H
    params = L * (per_layer_matrices + E * H + 2 * H) + 2 * V * H + H
    assert info["parameters"] == params  # 25.3 B in all (4.2 B active per token)
    report(f"XVERSE-MoE-A4.2B stand-in: {params / 1e9:.2f} B parameters (vocabulary 2000)")
    plan = plan_gguf(src, tmp_path / "x.gguf", "f16")
    # f16 GGUF: matrices in F16, the routers and norms in F32.
    assert plan.estimated_output_bytes() == 2 * (L * per_layer_matrices + 2 * V * H) + 4 * (L * (E * H + 2 * H) + H)
    stacked = E * F * H  # the largest tensor: one layer's 64 experts of one role, stacked
    assert plan.peak_memory_estimate() == BASE_MEMORY + 2 * stacked + 4 * stacked + 2 * stacked + 16 * CHUNK_VALUES
    assert plan.peak_memory_estimate() < 6 * 2**30
    nf4 = plan_nf4(src, tmp_path / "nf4")
    blocks = lambda n: n // 64  # noqa: E731  (every matrix here divides into blocks of 64)
    quantized = L * per_layer_matrices
    assert sum(j.spec.nbytes for j in nf4.jobs if j.spec.name.endswith(".weight") and j.spec.dtype == torch.uint8
               and ".layers." in j.spec.name) == quantized // 2
    assert sum(j.spec.nbytes for j in nf4.jobs if j.spec.name.endswith(".absmax")) == 4 * blocks(quantized)
    proc = run_cli("gguf", src, tmp_path / "x.gguf", "--outtype", "q4_k_m", "--dry-run", check=True)
    assert "deepseek" in proc.stdout and not (tmp_path / "x.gguf").exists()
