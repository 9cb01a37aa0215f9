"""The architecture registry: data files, inheritance, and errors that list what is known."""

from __future__ import annotations

import pytest

from xquant.arch import for_config, get, known
from xquant.errors import UnsupportedError


def test_llama_roles_and_groups():
    arch = get("llama")
    assert arch.layer_tensor("q", 7) == "model.layers.7.self_attn.q_proj.weight"
    assert arch.linear_roles() == ["q", "k", "v", "o", "gate", "up", "down"]
    assert arch.layer_of("model.layers.12.mlp.up_proj.weight") == 12 and arch.layer_of("lm_head.weight") is None


def test_xverse_is_llama_with_its_own_names():
    x, llama = get("xverse"), get("llama")
    assert x.hf_architectures == ("XverseForCausalLM",) and x.gguf_arch == "xverse"
    assert x.layer == llama.layer and x.sequential == llama.sequential and x.globals == llama.globals
    assert for_config({"architectures": ["XverseForCausalLM"]}).name == "xverse"


def test_unknown_names_list_the_known_ones():
    with pytest.raises(UnsupportedError, match="known: " + ", ".join(known())):
        get("gpt2")
    with pytest.raises(UnsupportedError, match=r"BloomForCausalLM.*LlamaForCausalLM.*XverseForCausalLM"):
        for_config({"architectures": ["BloomForCausalLM"]})
