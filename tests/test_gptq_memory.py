"""GPTQ's memory at real shapes, on small stand-ins: the in-place steps give the same bits as the
out-of-place ones, the compact linears give back the core's float32 weights exactly, and the
dry-run estimate is the formula written out by hand. Measured peaks against the estimate are
bench/gptq_shapes.py's job: at test sizes the process's own 0.9 GiB of torch dominates them."""

from __future__ import annotations

import json

import pytest
import torch

from xquant.quant.gptq import core, pack
from xquant.quant.gptq.plan import GPTQ_BASE_MEMORY, GPTQOptions, plan_gptq
from xquant.quant.gptq.walker import BATCH_TOKENS, StoredLinear

from helpers import write_safetensors


def _hessian(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3 * n, n, generator=g) * torch.linspace(0.1, 3, n)
    return torch.zeros(n, n).addmm_(x.t(), x).mul_(2 / (3 * n))


def test_in_place_permutation_and_inverse_cholesky_match_out_of_place():
    H = _hessian(300)
    perm = torch.randperm(300, generator=torch.Generator().manual_seed(1))
    ref = H.index_select(0, perm).index_select(1, perm)
    assert torch.equal(core._permute_symmetric_(H.clone(), perm, rows=64), ref)
    # The factor the core used to compute: a new tensor per step.
    D = ref.clone()
    D.diagonal().add_(0.01 * float(D.diagonal().mean()))
    L = torch.linalg.cholesky(D)
    U_ref = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    U, lam = core.inverse_cholesky(ref, 0.01, "w")
    assert lam == 0.01 and torch.equal(U, U_ref) and U.stride() == U_ref.stride()


def test_inverse_cholesky_retries_from_the_original_after_a_failure():
    H = torch.ones(64, 64)  # rank 1: fails with small damping, in place or not
    U, lam = core.inverse_cholesky(H.clone(), 1e-6, "w")
    D = torch.ones(64, 64) + lam * torch.eye(64)
    assert lam > 1e-6
    assert torch.equal(U, torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(D)), upper=True))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_owned_quantization_and_compact_linear_give_the_same_bits(bits):
    g = torch.Generator().manual_seed(bits)
    W = (torch.randn(96, 256, generator=g) * 0.02).half()
    H = _hessian(256, bits)
    spec = core.QuantSpec(bits=bits, group_size=64)
    ref = core.gptq_quantize(W, H, spec, "w")
    qw = core.gptq_quantize(W.clone(), H.clone(), spec, "w", owned=True)
    assert torch.equal(qw.codes, ref.codes) and torch.equal(qw.weight, ref.weight)
    linear = StoredLinear(W.clone(), None)
    assert torch.equal(linear.float_weight(), W.float())
    packed = pack.pack_linear(qw, bits)
    linear.set_quantized(qw, packed["qweight"], bits, torch.device("cpu"))
    out = linear.float_weight(rows=40)  # blocks that do not divide the rows
    assert torch.equal(out, qw.weight) and out.stride() == qw.weight.stride()


def test_dry_run_estimate_is_the_formula(tmp_path, tiny_tokenizer):
    h, f, kv, v = 512, 1536, 128, 2000
    g = torch.Generator().manual_seed(0)
    shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
              "self_attn.o_proj": (h, h), "mlp.gate_proj": (f, h), "mlp.up_proj": (f, h), "mlp.down_proj": (h, f)}
    tensors = {"model.embed_tokens.weight": torch.randn(v, h, generator=g).half()}
    p = "model.layers.0."
    tensors[p + "input_layernorm.weight"] = torch.ones(h, dtype=torch.float16)
    tensors[p + "post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.float16)
    for name, shape in shapes.items():
        tensors[f"{p}{name}.weight"] = (torch.randn(shape, generator=g) * 0.02).half()
    tensors["model.norm.weight"] = torch.ones(h, dtype=torch.float16)
    tensors["lm_head.weight"] = torch.randn(v, h, generator=g).half()
    model = tmp_path / "m"
    model.mkdir()
    write_safetensors(model, tensors)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h,
              "intermediate_size": f, "num_hidden_layers": 1, "num_attention_heads": 8, "num_key_value_heads": 2,
              "vocab_size": v, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "torch_dtype": "float16"}
    (model / "config.json").write_text(json.dumps(config))
    for t in tiny_tokenizer.iterdir():
        (model / t.name).write_bytes(t.read_bytes())
    plan = plan_gptq(model, tmp_path / "out", GPTQOptions(samples=8, seq_len=256))

    acts = 8 * 256 * h * 2  # float16 activations, in and out
    batch = 8 * 256 * f * 4 * 4  # 2048 tokens (below BATCH_TOKENS) x ffn, four float32 tensors
    assert 8 * 256 < BATCH_TOKENS
    order = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
             "mlp.up_proj", "mlp.down_proj"]
    params = [shapes[n][0] * shapes[n][1] for n in order]
    work = 0
    for k, name in enumerate(order):
        out_f, in_f = shapes[name]
        layer_now = sum(params[:k]) * 0.5 + sum(params[k:]) * 2  # packed 4-bit codes, float16 weights
        hh, w = in_f * in_f * 4, out_f * in_f * 4
        work = max(work, layer_now + max(hh + w + batch, 2 * hh + w, hh + 5 * w))
    norms = 2 * h * 2
    assert plan.peak_memory_estimate() == int(GPTQ_BASE_MEMORY + 2 * acts + norms + work)
    # At this width the down_proj's Hessian collection (H, W and a batch of MLP activations) is the
    # peak; at 70B widths it is the end of its quantization (H + 5 W).
    assert work == sum(params[:6]) * 0.5 + params[6] * 2 + f * f * 4 + h * f * 4 + batch
