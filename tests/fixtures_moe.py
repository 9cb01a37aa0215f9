"""Test fixture: a tiny trained mixture-of-experts model with a shared expert (`Qwen2MoeForCausalLM`).

transformers' in-library Qwen2-MoE has what XVERSE-MoE and DeepSeek-MoE have (routed experts picked
top-k by a softmax router, plus an always-on shared expert, here behind a sigmoid gate) and a
llama.cpp architecture (`qwen2moe`), so one fixture covers int8/NF4, GGUF and the report. It uses
the tiny LLaMA's tokenizer and corpus and is trained briefly, so its predictions mean something.

On disk transformers 5 writes each routed expert as its own Linear weights
(`mlp.experts.{e}.gate_proj.weight`); in memory it fuses them into 3-D parameters.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from xquant.demo import tiny
from xquant.console import info


@dataclass(frozen=True)
class MoESpec:
    """Rows and in-features are multiples of 256 so every GGUF type applies to every expert."""

    experts: int = 8
    experts_used: int = 2
    expert_ffn: int = 256
    shared_ffn: int = 512
    dense_ffn: int = 768  # config.intermediate_size: unused while every layer is sparse
    num_layers: int = 2
    # Brief: the eager expert loop makes a step ~5x the tiny LLaMA's, and a fixture must build in
    # about a minute on 2 busy cores. Enough for the router and experts to leave random init.
    steps: int = 40
    batch: int = 8
    lr: float = 5e-3


MOE = MoESpec()


def moe_config(spec: MoESpec, vocab_size: int, **overrides):
    from transformers import Qwen2MoeConfig

    base = tiny.SPEC
    fields = dict(
        vocab_size=vocab_size, hidden_size=base.hidden_size, intermediate_size=spec.dense_ffn,
        moe_intermediate_size=spec.expert_ffn, shared_expert_intermediate_size=spec.shared_ffn,
        num_experts=spec.experts, num_experts_per_tok=spec.experts_used, norm_topk_prob=False,
        decoder_sparse_step=1, num_hidden_layers=spec.num_layers, num_attention_heads=base.num_heads,
        num_key_value_heads=base.num_kv_heads, max_position_embeddings=base.context, rms_norm_eps=1e-6,
        rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=None,
        architectures=["Qwen2MoeForCausalLM"],
    )
    fields.update(overrides)
    return Qwen2MoeConfig(**fields)


def _build(tmp: Path, spec: MoESpec) -> None:
    import torch
    from transformers import Qwen2MoeForCausalLM

    tok_dir = tiny.tokenizer_dir()
    tokenizer = tiny.load_tokenizer(tok_dir)
    ids = tiny.encode_set(tokenizer, "mixed", "calib")
    torch.manual_seed(tiny.SPEC.seed)
    model = Qwen2MoeForCausalLM(moe_config(spec, len(tokenizer)))
    t0 = time.time()
    info(f"training the tiny MoE: {sum(p.numel() for p in model.parameters()):,} parameters, "
         f"{spec.experts} experts (top-{spec.experts_used}) + 1 shared, {spec.steps} steps")
    loss = tiny.train(model, ids, replace(tiny.SPEC, batch=spec.batch), spec.steps, spec.lr, tiny.SPEC.seed)
    tiny.save_fixture(model, tmp, tok_dir, {"spec": asdict(spec), "final_train_loss": loss,
                                            "train_seconds": round(time.time() - t0, 1)})


def moe_dir(spec: MoESpec = MOE) -> Path:
    """The tiny trained Qwen2MoeForCausalLM (fp32 safetensors + the tiny tokenizer), built once."""
    key = tiny.cache_key(tiny.SPEC, "moe-qwen2moe-" + json.dumps(asdict(spec), sort_keys=True))
    return tiny._cached("moe-qwen2moe", key, lambda tmp: _build(tmp, spec))
