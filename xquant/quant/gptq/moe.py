"""Mixture-of-experts layers for the GPTQ walker: routed experts as one Linear triple each.

transformers 5 holds a layer's routed experts as fused 3-D parameters (Qwen2-MoE:
`experts.gate_up_proj` [E, 2·ffn, hidden], `experts.down_proj` [E, hidden, ffn]) and runs them in a
loop over experts, so there is no per-expert Linear to hook. The walker swaps that module for
`UnfusedExperts`: the same forward (same routing input, same order of experts, same
accumulation), but each expert's gate/up/down is an nn.Linear named as on disk
(`mlp.experts.{e}.gate_proj`). The model's own router (top-k, norm_topk_prob and all) still runs
in front of it, so each expert's forward hooks see exactly the tokens routed to it: its gate/up
Hessian comes from those tokens, its down Hessian from its own intermediate activations on them.
GPTQModel's loader (defuser) runs the quantized checkpoint the same way.

`fuse_experts` goes the other way for the dequantized reference model: per-expert weights stacked
into transformers' fused parameters, as the architecture's TOML describes (`[gptq] fused_experts`).
"""

from __future__ import annotations

import torch
from torch import nn

from ...arch import Architecture
from ...errors import ShapeError, UnsupportedError

EXPERT_PREFIX = "experts."  # in a `[gptq] sequential` group: that role of every routed expert


def experts_module(arch: Architecture) -> str | None:
    """The module path (inside a decoder layer) of the routed experts, or None for a dense model."""
    return arch.gptq.experts_module if arch.is_moe else None


class _Expert(nn.Module):
    def __init__(self, names: dict[str, str], hidden: int, ffn: int):
        super().__init__()
        self.names = names  # role (gate/up/down) -> attribute name as on disk (gate_proj ...)
        setattr(self, names["gate"], nn.Linear(hidden, ffn, bias=False))
        setattr(self, names["up"], nn.Linear(hidden, ffn, bias=False))
        setattr(self, names["down"], nn.Linear(ffn, hidden, bias=False))

    def linear(self, role: str) -> nn.Linear:
        return getattr(self, self.names[role])


class UnfusedExperts(nn.Module):
    """Drop-in for transformers' fused experts module: forward(hidden [T, H], top_k_index [T, k],
    top_k_weights [T, k]) -> [T, H], each expert a SwiGLU-style MLP of three Linears, the expert
    e's module named "e" (so its parameters are "e.gate_proj.weight", as on disk)."""

    def __init__(self, count: int, names: dict[str, str], hidden: int, ffn: int, act: str):
        from transformers.activations import ACT2FN

        super().__init__()
        self.count = count
        for e in range(count):
            self.add_module(str(e), _Expert(names, hidden, ffn))
        self.act_fn = ACT2FN[act]

    def expert(self, e: int) -> _Expert:
        return getattr(self, str(e))

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for e in range(self.count):
            expert = self.expert(e)
            # Tokens routed to expert e, and which of their k slots chose it (its routing weight).
            token_idx, slot = torch.where(top_k_index == e)
            if token_idx.numel() == 0:
                continue  # an expert no token chose never runs: its hooks see nothing
            x = hidden_states[token_idx]
            # gate and up are called with the very same tensor: the walker's hooks then compute
            # their shared Hessian once.
            h = self.act_fn(expert.linear("gate")(x)) * expert.linear("up")(x)
            y = expert.linear("down")(h) * top_k_weights[token_idx, slot, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out


def _attr_names(arch: Architecture, config: dict, i: int) -> tuple[int, dict[str, str], str]:
    """(expert count, role -> attribute name, the experts' module prefix) from the TOML templates."""
    names = arch.expert_tensors(i, config)
    module = experts_module(arch)
    head = f"{arch.layers_module}.{i}.{module}.0."
    attrs = {}
    for role in ("gate", "up", "down"):
        if role not in names:
            raise UnsupportedError(f"{arch.name}: [experts] has no '{role}' template (GPTQ needs gate, up and down)")
        first = names[role][0]
        if not (first.startswith(head) and first.endswith(".weight")) or "." in first[len(head):-len(".weight")]:
            raise UnsupportedError(f"{first}: a routed expert's linear must be '<layer>.{module}.<e>.<name>.weight'")
        attrs[role] = first[len(head):-len(".weight")]
    return len(names["gate"]), attrs, module


def unfuse_experts(layer: nn.Module, arch: Architecture, config: dict, reader, i: int) -> None:
    """Replace decoder layer i's fused experts module by `UnfusedExperts` (on the meta device;
    the walker then loads the per-expert weights from disk into it by name)."""
    module = experts_module(arch)
    if module is None:
        return
    count, attrs, module = _attr_names(arch, config, i)
    try:
        current = layer.get_submodule(module)
    except AttributeError:
        raise ShapeError(f"decoder layer {i} has no routed experts module '{module}' (a dense MLP layer in a "
                         f"mixture of experts, from mlp_only_layers / decoder_sparse_step?)") from None
    if f"0.{attrs['gate']}.weight" in current.state_dict():
        return  # already one module per expert (GPTQModel's defuser patches transformers' class when imported)
    gate = reader.info(arch.expert_tensors(i, config)["gate"][0]).shape  # [ffn, hidden]
    with torch.device("meta"):
        experts = UnfusedExperts(count, attrs, int(gate[1]), int(gate[0]), config.get("hidden_act", "silu"))
    layer.set_submodule(module, experts)


def fuse_experts(state: dict[str, torch.Tensor], arch: Architecture, config: dict,
                 wanted: set[str]) -> None:
    """Per-expert weights in `state` -> the fused parameters transformers' model has (`wanted`):
    `[gptq] fused_experts = { gate_up_proj = ["gate", "up"], ... }` concatenates each expert's roles
    along the output rows and stacks the experts. In place; a no-op when the model is not fused."""
    module = experts_module(arch)
    fused = arch.gptq.fused_experts
    if module is None or not fused:
        return
    for i in range(arch.num_layers(config)):
        names = arch.expert_tensors(i, config)
        for param, roles in fused.items():
            target = f"{arch.layers_module}.{i}.{module}.{param}"
            if target not in wanted:
                continue
            parts = [torch.cat([state.pop(names[r][e]) for r in roles], dim=0) for e in range(len(names[roles[0]]))]
            state[target] = torch.stack(parts)
