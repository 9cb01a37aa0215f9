"""XVERSE-MoE (XVERSE-MoE-A4.2B) in PyTorch: xquant's reference forward for `report`, `verify`, the
GGUF importance matrix, bitsandbytes and GPTQ.

The checkpoint ships as remote code and neither transformers nor llama.cpp has the class. Its math
(as SGLang's and vLLM's loaders run it): LLaMA attention (q/k/v/o without bias, RMSNorm, rotary over
the whole head in Hugging Face's half-split order), and in every decoder layer a mixture of experts:

    p = softmax(router(x))                       # over all `num_experts`, in float32
    w, e = top-k(p, moe_top_k)                   # renormalised to sum 1 only if norm_topk_prob
    y = sum_j w_j * expert_{e_j}(x) + shared(x)  # SwiGLU experts; shared: one MLP, no gate

where `shared` is the `num_shared_experts` shared experts fused into one MLP of width
`intermediate_size * num_shared_experts` (`intermediate_size` is one routed expert's width).

Attention, norms, rotary and the causal-LM wrapper are transformers' LLaMA classes; only the
block is new. Module names follow the checkpoint (`mlp.router.weight`,
`mlp.experts.{e}.gate_proj.weight`, `mlp.shared_experts.up_proj.weight`), so `from_pretrained`
loads it as it is. The router is a plain parameter, not an nn.Linear, so bitsandbytes and GPTQ
leave it in full precision; each routed expert is three nn.Linear modules run only on the tokens
routed to it (GPTQ's hooks see exactly those tokens; gate and up get the very same tensor).

Importing this module registers `XverseMoeConfig` (model_type "xverse_moe") and
`XverseMoeForCausalLM` with transformers' AutoConfig / AutoModelForCausalLM.
"""

from __future__ import annotations

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig
from transformers.activations import ACT2FN
from transformers.models.llama.modeling_llama import (LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM,
                                                      LlamaModel, LlamaPreTrainedModel, LlamaRMSNorm,
                                                      LlamaRotaryEmbedding)

MODEL_TYPE = "xverse_moe"


@strict
class XverseMoeConfig(LlamaConfig):
    """LLaMA's config plus the mixture of experts: `num_experts` routed experts of width
    `intermediate_size`, `moe_top_k` per token, `num_shared_experts` always-on experts (fused
    into one MLP; None or 0: none), `norm_topk_prob` (absent in XVERSE's config: false)."""

    model_type = MODEL_TYPE

    num_experts: int = 64
    moe_top_k: int = 6
    num_shared_experts: int | None = 2
    norm_topk_prob: bool = False


class XverseMoeMLP(nn.Module):
    """SwiGLU MLP: down(act(gate(x)) * up(x)), no biases."""

    def __init__(self, hidden: int, width: int, act: str):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, width, bias=False)
        self.up_proj = nn.Linear(hidden, width, bias=False)
        self.down_proj = nn.Linear(width, hidden, bias=False)
        self.act_fn = ACT2FN[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class XverseMoeRouter(nn.Module):
    """The router's logits, x @ weightᵀ (weight [num_experts, hidden]). A parameter, not an
    nn.Linear: quantizers that replace nn.Linear keep it as it is."""

    def __init__(self, hidden: int, experts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(experts, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight)


class XverseMoeExperts(nn.ModuleList):
    """The routed experts, module "e" for expert e (parameters `{e}.gate_proj.weight`, as on disk)."""

    def __init__(self, count: int, hidden: int, width: int, act: str):
        super().__init__([XverseMoeMLP(hidden, width, act) for _ in range(count)])

    def forward(self, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, H], index / weights [T, k] (expert ids and their routing weights) -> [T, H]."""
        out = torch.zeros_like(x)
        for e, expert in enumerate(self):
            tokens, slot = torch.where(index == e)
            if tokens.numel() == 0:
                continue  # an expert no token chose does not run (its hooks see nothing)
            y = expert(x[tokens]) * weights[tokens, slot, None]
            out.index_add_(0, tokens, y.to(out.dtype))
        return out


class XverseMoeBlock(nn.Module):
    """The mixture of experts of one decoder layer (see the module doc)."""

    def __init__(self, config: XverseMoeConfig):
        super().__init__()
        hidden, width, act = config.hidden_size, config.intermediate_size, config.hidden_act
        self.top_k = config.moe_top_k
        self.norm_topk_prob = bool(config.norm_topk_prob)
        self.router = XverseMoeRouter(hidden, config.num_experts)
        self.experts = XverseMoeExperts(config.num_experts, hidden, width, act)
        shared = config.num_shared_experts or 0
        self.shared_experts = XverseMoeMLP(hidden, width * shared, act) if shared else None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(expert ids [T, k], routing weights [T, k]) for tokens x [T, H]."""
        probs = torch.softmax(self.router(x).float(), dim=-1)
        weights, index = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return index, weights.to(x.dtype)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        index, weights = self.route(x)
        out = self.experts(x, index, weights)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out.reshape(shape)


class XverseMoeDecoderLayer(LlamaDecoderLayer):
    """LLaMA's decoder layer (attention, norms, residuals) with the mixture of experts as its MLP."""

    def __init__(self, config: XverseMoeConfig, layer_idx: int):
        nn.Module.__init__(self)
        self.hidden_size = config.hidden_size
        self.self_attn = LlamaAttention(config=config, layer_idx=layer_idx)
        self.mlp = XverseMoeBlock(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class XverseMoePreTrainedModel(LlamaPreTrainedModel):
    config_class = XverseMoeConfig
    config: XverseMoeConfig
    _no_split_modules = ["XverseMoeDecoderLayer"]
    _can_compile_fullgraph = False  # data-dependent expert loop
    _can_record_outputs = {"hidden_states": XverseMoeDecoderLayer, "attentions": LlamaAttention}

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, XverseMoeRouter):
            from transformers import initialization as init

            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)


class XverseMoeModel(XverseMoePreTrainedModel, LlamaModel):
    """LLaMA's model body (embedding, causal mask, rotary, final norm) over XVERSE-MoE layers."""

    def __init__(self, config: XverseMoeConfig):
        XverseMoePreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([XverseMoeDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()


class XverseMoeForCausalLM(XverseMoePreTrainedModel, LlamaForCausalLM):
    """The causal LM: XverseMoeModel + lm_head (LLaMA's forward)."""

    def __init__(self, config: XverseMoeConfig):
        XverseMoePreTrainedModel.__init__(self, config)
        self.model = XverseMoeModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


def _register() -> None:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if MODEL_TYPE not in CONFIG_MAPPING:
        AutoConfig.register(MODEL_TYPE, XverseMoeConfig)
        AutoModelForCausalLM.register(XverseMoeConfig, XverseMoeForCausalLM)


_register()
