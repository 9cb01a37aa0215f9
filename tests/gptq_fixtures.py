"""A quantization-sensitive twin of the tiny model, for GPTQ's accuracy tests.

The tiny model is robust to 4-bit weight noise: round-to-nearest moves its held-out perplexity by
about 0.05 %, less than the run-to-run wobble of which noise happens to help (RTN even "improves"
the code set), so GPTQ versus RTN cannot be told apart on it. Real LLMs are sensitive because of
activation outlier channels: a few input channels carry activations many times larger than the
rest, while their weights are correspondingly small. This fixture gives the tiny model that
structure without changing the function it computes: per channel, an activation is multiplied by
a factor and the weight column reading it is divided by the same factor (a norm weight before
q/k/v and gate/up, v_proj rows before o_proj, up_proj rows before down_proj). Factors are
log-normal (σ = 1) with 4 outlier channels ×16 per site. Logits are unchanged (checked by the
tests); RTN at 4 bits then costs 5-40 % perplexity, which GPTQ's Hessian-aware rounding removes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from helpers import write_safetensors
from xquant.demo import tiny
from xquant.io.readers import open_hf_tensors

SIGMA, OUTLIERS, MAGNITUDE, SEED = 1.0, 4, 16.0, 7


def _factors(n: int, g: torch.Generator) -> torch.Tensor:
    f = torch.exp(torch.randn(n, generator=g) * SIGMA)
    f[torch.randperm(n, generator=g)[:OUTLIERS]] *= MAGNITUDE
    return f


def reparametrize(sd: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """The function-preserving per-channel rescaling described above, in place."""
    h, f = config["hidden_size"], config["intermediate_size"]
    nh, nkv = config["num_attention_heads"], config["num_key_value_heads"]
    hd = h // nh
    g = torch.Generator().manual_seed(SEED)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        a = _factors(h, g)
        sd[p + "input_layernorm.weight"] *= a
        for r in ("q", "k", "v"):
            sd[p + f"self_attn.{r}_proj.weight"] /= a[None, :]
        b = _factors(h, g)
        sd[p + "post_attention_layernorm.weight"] *= b
        for r in ("gate", "up"):
            sd[p + f"mlp.{r}_proj.weight"] /= b[None, :]
        c = _factors(nkv * hd, g)  # v_proj output channels, read by every query head of their group
        sd[p + "self_attn.v_proj.weight"] *= c[:, None]
        sd[p + "self_attn.o_proj.weight"] /= c.view(nkv, 1, hd).expand(nkv, nh // nkv, hd).reshape(h)[None, :]
        e = _factors(f, g)
        sd[p + "mlp.up_proj.weight"] *= e[:, None]
        sd[p + "mlp.down_proj.weight"] /= e[None, :]
    return sd


def outlier_model_dir() -> Path:
    """The tiny model with activation outlier channels (cached beside the tiny model)."""
    src = tiny.model_dir()

    def build(tmp: Path) -> None:
        reader = open_hf_tensors(src)
        sd = {n: reader.get(n) for n in reader.names()}
        config = json.loads((src / "config.json").read_text())
        write_safetensors(tmp, reparametrize(sd, config))
        for f in src.iterdir():
            if f.is_file() and not f.name.endswith(".safetensors"):
                shutil.copy2(f, tmp / f.name)

    return tiny._cached("llama-outliers", tiny.cache_key(tiny.SPEC, "gptq-outlier-channels-v1"), build)
