"""Test fixture: a tiny, briefly trained XVERSE-MoE checkpoint (XverseMoeForCausalLM, remote code).

Shaped like XVERSE-MoE-A4.2B in miniature: LLaMA attention with grouped-query heads (8 heads, 2 kv),
every layer a mixture of 8 routed experts (top-3, more experts than the router picks, so routing
matters) plus 2 shared experts fused into one MLP of twice an expert's width, no shared-expert gate,
and norm_topk_prob absent from config.json (false), as XVERSE writes it. It is trained with
xquant's own implementation (xquant/models/xverse_moe.py) on the tiny LLaMA's corpus, then saved
the way XVERSE ships: config `XverseMoeForCausalLM` / model_type `xverse` with an `auto_map` to remote
code, and a BPE tokenizer.json (SentencePiece pieces, byte fallback) without tokenizer.model
(fixtures_xverse.py's tokenizer kind).

Widths are multiples of 256 so every GGUF type applies to every expert.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from xquant.demo import tiny
from xquant.console import info

# Bump when the way the fixture is built changes.
BUILD = 1


@dataclass(frozen=True)
class XverseMoESpec:
    experts: int = 8
    top_k: int = 3
    shared: int = 2
    expert_ffn: int = 256  # config.intermediate_size: one expert's width (shared MLP: 2 x 256)
    num_layers: int = 2
    steps: int = 40
    batch: int = 8
    lr: float = 5e-3


SPEC = XverseMoESpec()


def xverse_moe_config(spec: XverseMoESpec, vocab_size: int, **overrides):
    from xquant.models.xverse_moe import XverseMoeConfig

    base = tiny.SPEC
    fields = dict(
        vocab_size=vocab_size, hidden_size=base.hidden_size, intermediate_size=spec.expert_ffn,
        num_experts=spec.experts, moe_top_k=spec.top_k, num_shared_experts=spec.shared,
        num_hidden_layers=spec.num_layers, num_attention_heads=base.num_heads,
        num_key_value_heads=base.num_kv_heads, max_position_embeddings=base.context, rms_norm_eps=1e-6,
        rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=None,
    )
    fields.update(overrides)
    return XverseMoeConfig(**fields)


def as_released(config: dict) -> dict:
    """config.json as XVERSE's release writes it: its remote class, model_type "xverse", an auto_map
    to the remote code, and no norm_topk_prob (false when absent)."""
    out = {k: v for k, v in config.items() if k != "norm_topk_prob"}
    out.update(architectures=["XverseMoeForCausalLM"], model_type="xverse",
               auto_map={"AutoConfig": "configuration_xverse.XverseConfig",
                         "AutoModelForCausalLM": "modeling_xverse.XverseForCausalLM"})
    return out


def _build(tmp: Path, spec: XverseMoESpec) -> None:
    import torch

    from xquant.models.xverse_moe import XverseMoeForCausalLM

    tok_dir = tiny.tokenizer_dir()
    tokenizer = tiny.load_tokenizer(tok_dir)
    ids = tiny.encode_set(tokenizer, "mixed", "calib")
    torch.manual_seed(tiny.SPEC.seed)
    model = XverseMoeForCausalLM(xverse_moe_config(spec, len(tokenizer)))
    t0 = time.time()
    info(f"training the tiny XVERSE-MoE: {sum(p.numel() for p in model.parameters()):,} parameters, "
         f"{spec.experts} experts (top-{spec.top_k}) + {spec.shared} shared, {spec.steps} steps")
    loss = tiny.train(model, ids, replace(tiny.SPEC, batch=spec.batch), spec.steps, spec.lr, tiny.SPEC.seed)
    model.generation_config.do_sample = False
    model.save_pretrained(tmp)
    config = json.loads((tmp / "config.json").read_text())
    (tmp / "config.json").write_text(json.dumps(as_released(config), indent=2) + "\n")
    # XVERSE's tokenizer kind: tokenizer.json only (fixtures_xverse.py)
    from fixtures_xverse import XVERSE_TOKENIZER_CONFIG

    shutil.copy2(tok_dir / "tokenizer.json", tmp / "tokenizer.json")
    (tmp / "tokenizer_config.json").write_text(json.dumps(XVERSE_TOKENIZER_CONFIG, indent=2) + "\n")
    (tmp / "xquant-tiny.json").write_text(json.dumps(
        {"spec": asdict(spec), "final_train_loss": loss, "train_seconds": round(time.time() - t0, 1)}, indent=2) + "\n")


def xverse_moe_dir(spec: XverseMoESpec = SPEC) -> Path:
    """The tiny trained XVERSE-MoE (fp32 safetensors + XVERSE-style tokenizer.json), built once."""
    key = tiny.cache_key(tiny.SPEC, f"xverse-moe-{BUILD}-" + json.dumps(asdict(spec), sort_keys=True))
    return tiny._cached("xverse-moe", key, lambda tmp: _build(tmp, spec))
