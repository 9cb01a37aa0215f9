"""`xquant int8` / `xquant nf4` against transformers + bitsandbytes' own in-memory route.

On the tiny trained model the streamed artifacts must hold exactly the tensors (names, dtypes,
shapes, bits) and quantization_config that `from_pretrained(..., quantization_config=...)` +
`save_pretrained` write, reload with a plain `from_pretrained(OUT)` to the same logits, and keep
held-out perplexity near fp32. The quantizer cores are checked against bitsandbytes' functions on
random and adversarial tensors. Bad input fails with one line and leaves nothing behind.
"""

from __future__ import annotations

import json
from pathlib import Path

import bitsandbytes.functional as bnbf
import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_one_line_error, report, run_cli
from helpers import hf_logits, write_safetensors
from xquant.errors import InputError, UnsupportedError
from xquant.pipeline import execute
from xquant.quant import bnb_core as core
from xquant.quant.bnb import plan_int8, plan_nf4

IDS = torch.tensor([[1, 15, 200, 7, 999, 42, 3, 1500, 77, 1999]])
EVAL_TOKENS = 1024  # two 512-token windows of the held-out split keep the int8 CPU forward short
# Modes: (CLI arguments, BitsAndBytesConfig arguments). nf4-skip covers single quantization and a
# --skip-modules list (prefix and suffix patterns) that replaces transformers' default.
MODES = {
    "int8": (["int8"], dict(load_in_8bit=True)),
    "nf4-dq": (["nf4", "--double-quant"],
               dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)),
    "nf4-skip": (["nf4", "--skip-modules", "lm_head,model.layers.0.mlp,3.self_attn.o_proj"],
                 dict(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                      llm_int8_skip_modules=["lm_head", "model.layers.0.mlp", "3.self_attn.o_proj"])),
}


def _perplexity(model, tiny_path: Path) -> float:
    from xquant.demo import tiny
    from xquant.evaluate.perplexity import hf_logits_fn, perplexity

    ids = tiny.encode_set(tiny.load_tokenizer(tiny_path), "mixed", "eval")[:EVAL_TOKENS]
    return perplexity(hf_logits_fn(model), ids, tiny.SPEC.context)


@pytest.fixture(scope="module")
def tiny_path() -> Path:
    """The tiny trained model (conftest's `tiny_model` would also evaluate all 24k held-out tokens)."""
    from xquant.demo import tiny

    return tiny.model_dir()


@pytest.fixture(scope="module")
def artifacts(tiny_path, tmp_path_factory):
    """mode -> (streamed dir, transformers' saved dir, transformers' in-memory logits)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    root = tmp_path_factory.mktemp("bnb")
    out = {}
    for mode, (args, bnb_args) in MODES.items():
        model = AutoModelForCausalLM.from_pretrained(tiny_path, device_map="cpu",
                                                     quantization_config=BitsAndBytesConfig(**bnb_args))
        model.save_pretrained(root / f"{mode}-transformers")
        logits = hf_logits(model, IDS)
        del model
        run_cli(args[0], tiny_path, root / f"{mode}-xquant", *args[1:], check=True)
        out[mode] = (root / f"{mode}-xquant", root / f"{mode}-transformers", logits)
    return out


@pytest.mark.parametrize("mode", list(MODES))
def test_streamed_artifact_is_bit_identical_to_transformers(artifacts, mode):
    ours, theirs, _ = artifacts[mode]
    a, b = load_file(ours / "model.safetensors"), load_file(theirs / "model.safetensors")
    assert sorted(a) == sorted(b)
    for name in b:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert torch.equal(a[name], b[name]), name
    config = json.loads((ours / "config.json").read_text())
    assert config["quantization_config"] == json.loads((theirs / "config.json").read_text())["quantization_config"]
    quantized = [n for n in a if n.endswith((".SCB", ".quant_map")) and "nested" not in n]
    assert len(quantized) == {"int8": 28, "nf4-dq": 28, "nf4-skip": 28 - 4}[mode]
    assert (ours / "tokenizer.model").exists() and (ours / "xquant-manifest.json").exists()


def test_int8_reloads_to_the_same_logits_and_keeps_perplexity(artifacts, tiny_path):
    from transformers import AutoModelForCausalLM

    ours, _, reference_logits = artifacts["int8"]
    model = AutoModelForCausalLM.from_pretrained(ours)  # no quantization_config argument
    assert type(model.model.layers[0].mlp.down_proj).__name__ == "Linear8bitLt"
    assert torch.equal(hf_logits(model, IDS), reference_logits)
    fp32 = _perplexity(AutoModelForCausalLM.from_pretrained(tiny_path), tiny_path)
    ppl = _perplexity(model, tiny_path)
    report(f"int8 (streamed): held-out perplexity {ppl:.3f} vs fp32 {fp32:.3f} "
           f"({(ppl / fp32 - 1) * 100:+.3f}%, first {EVAL_TOKENS} tokens of mixed eval)")
    assert abs(ppl / fp32 - 1) < 0.01


@pytest.mark.parametrize("mode", ["nf4-dq", "nf4-skip"])
def test_nf4_reloads_to_the_same_logits_and_keeps_perplexity(artifacts, tiny_path, mode):
    from transformers import AutoModelForCausalLM

    ours, _, reference_logits = artifacts[mode]
    model = AutoModelForCausalLM.from_pretrained(ours)
    assert type(model.model.layers[1].mlp.down_proj).__name__ == "Linear4bit"
    assert torch.equal(hf_logits(model, IDS), reference_logits)
    if mode == "nf4-dq":
        fp32 = _perplexity(AutoModelForCausalLM.from_pretrained(tiny_path), tiny_path)
        ppl = _perplexity(model, tiny_path)
        report(f"nf4 + double quant (streamed): held-out perplexity {ppl:.3f} vs fp32 {fp32:.3f} "
               f"({(ppl / fp32 - 1) * 100:+.3f}%)")
        assert abs(ppl / fp32 - 1) < 0.05  # 4-bit: a few percent is the format's usual cost


def test_dry_run_prints_the_plan_and_writes_nothing(tiny_path, tmp_path):
    plan = json.loads(run_cli("int8", tiny_path, tmp_path / "o", "--dry-run", "--json", check=True).stdout)
    dtypes = {row["tensor"]: row["dtype"] for row in plan["tensors"]}
    assert dtypes["model.layers.0.self_attn.q_proj.weight"] == "int8"
    assert dtypes["model.layers.0.self_attn.q_proj.SCB"] == "float32"
    assert dtypes["lm_head.weight"] == "float32" and plan["summary"]["tensors"] == 95
    proc = run_cli("nf4", tiny_path, tmp_path / "o", "--double-quant", "--dry-run", check=True)
    assert "estimated peak memory" in proc.stdout and "estimates" in proc.stdout
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- cores vs bitsandbytes

def _samples():
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for shape in [(64, 256), (7, 33), (300, 100), (5, 1)]:  # tails, odd element counts
            w = (torch.randn(shape, generator=g) * 0.05).to(dtype)
            w[1 % shape[0]] = 0  # an all-zero row / block
            yield w


def test_int8_core_matches_bitsandbytes():
    for w in _samples():
        q, scb = core.int8_rows(w)
        ref_q, ref_scb, _ = bnbf.int8_vectorwise_quant(w.half().contiguous())
        assert torch.equal(q, ref_q) and torch.equal(scb, ref_scb), (w.dtype, w.shape)
        err = (core.int8_dequantize(q, scb) - w.float()).abs().max()
        assert err <= scb.max() / 127 / 2 + 1e-3


def test_nf4_core_and_double_quant_match_bitsandbytes():
    assert torch.equal(core.nf4_levels(), bnbf.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(core.dynamic_map(), bnbf.create_dynamic_map())
    for w in _samples():
        packed, absmax = core.nf4_blocks(w)
        ref, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
        assert torch.equal(packed, ref) and torch.equal(absmax, state.absmax), (w.dtype, w.shape)
        assert torch.equal(core.nf4_absmax(w), absmax)
        # Dequantized, every element is within half the widest NF4 level gap of its block's scale.
        err = (core.nf4_dequantize(packed, absmax, tuple(w.shape)) - w.float()).abs().reshape(-1)
        bound = absmax.repeat_interleave(64)[: err.numel()] * core.nf4_levels().diff().max() / 2
        assert bool((err <= bound + 1e-6).all())
        _, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        q, nested, offset = core.double_quantize(absmax)
        assert torch.equal(q, state.absmax) and torch.equal(nested, state.state2.absmax)
        assert offset.item() == state.offset.item()


def test_blockwise8_matches_the_native_kernel_at_table_boundaries():
    """bitsandbytes' CPU kernel maps values through a 65,536-entry table; probe the points where
    the table changes code, a few float32 steps either side, in blocks whose absmax is 1."""
    code = bnbf.create_dynamic_map()
    table = core._lookup_table(code).long()
    edges = (torch.nonzero(table[1:] != table[:-1]).flatten() + 1).double()
    probe = (2 * (edges - 0.5) / 65535 - 1).float()
    values, up, down = [probe], probe, probe
    for _ in range(24):
        up, down = torch.nextafter(up, torch.ones_like(up)), torch.nextafter(down, -torch.ones_like(down))
        values += [up, down]
    x = torch.cat(values).clamp(-1, 1)
    x = torch.nn.functional.pad(x, (0, -x.numel() % 255)).view(-1, 255)
    x = torch.cat([torch.ones(len(x), 1), x], dim=1).reshape(-1)[:-17]  # a short last block
    x[256:512] = 0  # an all-zero block
    q, absmax = core.blockwise8(x, code)
    ref, state = bnbf.quantize_blockwise(x, code=code.clone(), blocksize=256)
    assert torch.equal(q, ref) and torch.equal(absmax, state.absmax)


# ---------------------------------------------------------------- bad input

def _tiny_checkpoint(path: Path, layers: int, dtype=torch.float32) -> Path:
    h, f, v = 64, 128, 32
    tensors = {"model.embed_tokens.weight": torch.randn(v, h), "model.norm.weight": torch.ones(h),
               "lm_head.weight": torch.randn(v, h)}
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors.update({p + "input_layernorm.weight": torch.ones(h), p + "post_attention_layernorm.weight": torch.ones(h)})
        for name, shape in [("self_attn.q_proj", (h, h)), ("self_attn.k_proj", (h, h)), ("self_attn.v_proj", (h, h)),
                            ("self_attn.o_proj", (h, h)), ("mlp.gate_proj", (f, h)), ("mlp.up_proj", (f, h)),
                            ("mlp.down_proj", (h, f))]:
            tensors[p + name + ".weight"] = (torch.randn(shape) * 20).to(dtype)
    path.mkdir()
    write_safetensors(path, tensors)
    (path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h, "intermediate_size": f,
        "num_hidden_layers": layers, "num_attention_heads": 4, "vocab_size": v}))
    return path


def test_already_quantized_input(artifacts, tmp_path):
    int8_dir = artifacts["int8"][0]
    assert_one_line_error(run_cli("int8", int8_dir, tmp_path / "again"), "config.json", "already quantized")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(UnsupportedError, match="already quantized"):
        plan_nf4(int8_dir, tmp_path / "again")


def test_no_linear_layers_to_quantize(tiny_path, tmp_path):
    empty = _tiny_checkpoint(tmp_path / "m", layers=0)
    assert_one_line_error(run_cli("int8", empty, tmp_path / "o"), "no linear layers to quantize")
    assert {p.name for p in tmp_path.iterdir()} == {"m"}
    with pytest.raises(UnsupportedError, match="no linear layers to quantize .all 29 are skipped"):
        plan_nf4(tiny_path, tmp_path / "o", skip_modules="model.layers,lm_head")


def test_non_float_source_dtype(tmp_path):
    ints = _tiny_checkpoint(tmp_path / "m", layers=1, dtype=torch.int8)
    assert_one_line_error(run_cli("int8", ints, tmp_path / "o"),
                          "model.layers.0.self_attn.q_proj.weight", "int8, not floating point")
    assert {p.name for p in tmp_path.iterdir()} == {"m"}


def test_values_beyond_float16_fail_during_the_write_and_leave_nothing(tmp_path):
    big = _tiny_checkpoint(tmp_path / "m", layers=1)
    w = {n: t.clone() for n, t in load_file(big / "model.safetensors").items()}  # not the mapped file
    w["model.layers.0.mlp.up_proj.weight"][3, 5] = 1e6
    write_safetensors(big, w)
    with pytest.raises(UnsupportedError, match="up_proj.weight.*float16"):
        execute(plan_int8(big, tmp_path / "o"))
    assert {p.name for p in tmp_path.iterdir()} == {"m"}
    execute(plan_nf4(big, tmp_path / "o"))  # NF4 scales float32 blocks: no float16 limit
    assert (tmp_path / "o" / "model.safetensors").exists()
    w["model.layers.0.mlp.up_proj.weight"][3, 5] = float("nan")
    write_safetensors(big, w)
    with pytest.raises(InputError, match="up_proj.weight.*NaN"):
        execute(plan_nf4(big, tmp_path / "o", double_quant=True), force=True)
    assert {p.name for p in tmp_path.iterdir()} == {"m", "o"}
