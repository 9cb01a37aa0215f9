"""The architecture registry: data files, inheritance, typed sections checked at load, and errors
that list what is known."""

from __future__ import annotations

import re
import tomllib
from dataclasses import fields

import pytest

from xquant.arch import ExpertsSpec, GGUFSpec, GPTQSpec, MetaConvertSpec, for_config, get, known, load
from xquant.errors import UnsupportedError
from xquant.paths import data_dir


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


# ---------------------------------------------------------------- typed sections, checked at load
MINIMAL = """\
name = "tiny"
hf_architectures = ["TinyForCausalLM"]

[layer]
q = "model.layers.{i}.q.weight"

[quant]
sequential = [["q"]]
"""


def _write(tmp_path, text: str, name: str = "tiny.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_minimal_file_loads_with_defaults(tmp_path):
    arch = load(_write(tmp_path, MINIMAL))
    assert arch.model_type == "tiny" and arch.sequential == (("q",),) and arch.layers_module == "model.layers"
    assert arch.gguf == GGUFSpec() and arch.gptq == GPTQSpec() and arch.meta_convert == MetaConvertSpec()
    assert arch.experts is None and not arch.is_moe and arch.expert_tensors(0, {}) == {}


@pytest.mark.parametrize("text, key, known", [
    (MINIMAL + '\n[gguf]\nrope_permut = { q = "num_attention_heads" }\n', "gguf.rope_permut", "rope_permute"),
    (MINIMAL.replace('name = "tiny"', 'name = "tiny"\ngguf_ach = "llama"'), "gguf_ach", "gguf_arch"),
    (MINIMAL + '\n[gptq]\nconfig_klass = "transformers.LlamaConfig"\n', "gptq.config_klass", "config_class"),
    (MINIMAL + '\n[meta]\nq = { name = "layers.{i}.wq.weight", dimm = 0 }\n', "meta.q.dimm", "replicated"),
    (MINIMAL + '\n[experts]\ncount = "n"\nused = "k"\ngate = "g"\nup = "u"\ndown = "d"\nshared = "s"\n',
     "experts.shared", "count"),
    (MINIMAL + '\n[quantize]\nsequential = [["q"]]\n', "quantize", "quant"),
])
def test_unknown_keys_are_refused_naming_file_and_key(tmp_path, text, key, known):
    path = _write(tmp_path, text)
    with pytest.raises(UnsupportedError) as e:
        load(path)
    msg = str(e.value)
    assert str(path) in msg and f"unknown key '{key}'" in msg and known in msg.split("known", 1)[1]
    assert "\n" not in msg


def test_unknown_key_in_a_base_names_the_file_that_holds_it(tmp_path):
    _write(tmp_path, MINIMAL.replace("[quant]", '[quant]\nlayer_module = "model.layers"'), "base.toml")
    child = _write(tmp_path, 'base = "base"\nname = "child"\nhf_architectures = ["ChildForCausalLM"]\n', "child.toml")
    with pytest.raises(UnsupportedError, match=re.escape(str(tmp_path / "base.toml")) + ".*'quant.layer_module'"):
        load(child)


@pytest.mark.parametrize("text, key", [
    (MINIMAL + '\n[gguf]\nskip = "rotary_emb.inv_freq"\n', "gguf.skip"),
    (MINIMAL.replace('["TinyForCausalLM"]', '"TinyForCausalLM"'), "hf_architectures"),
    (MINIMAL.replace('[["q"]]', '[["q", 1]]'), "quant.sequential[0][1]"),
    (MINIMAL + '\n[meta]\nq = { name = "layers.{i}.wq.weight", dim = true }\n', "meta.q.dim"),
    (MINIMAL + '\n[gguf.hparams]\nexpert_count = 8\n', "gguf.hparams.expert_count"),
    (MINIMAL + '\n[base_identity]\nrope_scaling = { type = "linear" }\n', "base_identity.rope_scaling"),
    (MINIMAL.replace('name = "tiny"', 'name = "tiny"\ntransformers_as = "LlamaForCausalLM"'), "transformers_as"),
])
def test_wrong_types_are_refused_in_one_line(tmp_path, text, key):
    path = _write(tmp_path, text)
    with pytest.raises(UnsupportedError) as e:
        load(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: '{key}' must be ") and "\n" not in msg


@pytest.mark.parametrize("text, match", [
    (MINIMAL.replace('name = "tiny"\n', ""), "missing key 'name'"),
    (MINIMAL + '\n[experts]\ncount = "num_experts"\n', "missing key 'experts.used'"),
    (MINIMAL.replace('[["q"]]', '[["q", "k"]]'), r"\[quant\] sequential names role 'k'"),
    (MINIMAL + '\n[gguf]\nrope_permute = { k = "num_key_value_heads" }\n', r"\[gguf\] rope_permute names role 'k'"),
    (MINIMAL + '\n[meta]\nq = { name = "layers.{i}.wq.weight" }\n', "'meta.q' needs dim"),
    (MINIMAL + '\n[gptq]\nsequential = [["experts.gate"]]\n', r"\[gptq\] sequential names role 'gate'"),
])
def test_missing_keys_and_unknown_roles_are_refused(tmp_path, text, match):
    with pytest.raises(UnsupportedError, match=match):
        load(_write(tmp_path, text))


def _section_keys(path) -> dict[str, set[str]]:
    with open(path, "rb") as f:
        data = tomllib.load(f)
    return {k: set(v) for k, v in data.items() if isinstance(v, dict)}


def test_every_key_of_the_shipped_files_is_a_field():
    """Had the loader ignored unknown keys, a shipped key could be a typo no field reads."""
    typed = {"gguf": GGUFSpec, "experts": ExpertsSpec, "gptq": GPTQSpec, "meta_convert": MetaConvertSpec}
    for path in sorted(data_dir("converters").glob("*.toml")):
        for section, keys in _section_keys(path).items():
            if section in typed:
                assert keys <= {f.name for f in fields(typed[section])}, (path, section)


def test_shipped_architectures_hold_their_files_values():
    llama, xverse, moe = get("llama"), get("xverse"), get("qwen2moe")
    assert llama.gguf.rope_permute == {"q": "num_attention_heads", "k": "num_key_value_heads"}
    assert llama.gguf.skip == ("rotary_emb.inv_freq",) and llama.gguf.vocab is None
    assert llama.meta_convert == MetaConvertSpec({"q": "n_heads", "k": "n_kv_heads"}, ("rope.freqs",))
    assert llama.meta["norm"].replicated and llama.meta["o"].dim == 1
    assert llama.meta["q"].name == "layers.{i}.attention.wq.weight"
    assert llama.derived == {"rotary_inv_freq": "model.layers.{i}.self_attn.rotary_emb.inv_freq"}
    assert llama.base_identity["rms_norm_eps"] == 1e-6 and llama.base_identity["max_position_embeddings"] == 2048
    assert llama.gptq.config_class == "transformers.LlamaConfig" and llama.gptq.sequential is None
    assert llama.transformers_as is None and not llama.is_moe

    assert xverse.gguf.vocab == "sentencepiece-json" and xverse.gguf.rope_permute == llama.gguf.rope_permute
    assert xverse.transformers_as.config_fields() == {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    assert xverse.meta == llama.meta and xverse.base_identity == llama.base_identity

    assert moe.is_moe and moe.model_type == "qwen2_moe" and moe.meta == {} and moe.gguf.rope_permute == {}
    assert moe.experts == ExpertsSpec("num_experts", "num_experts_per_tok",
                                      "model.layers.{i}.mlp.experts.{e}.gate_proj.weight",
                                      "model.layers.{i}.mlp.experts.{e}.up_proj.weight",
                                      "model.layers.{i}.mlp.experts.{e}.down_proj.weight")
    assert moe.gguf.f32 == ("ffn_gate_inp", "ffn_gate_inp_shexp")
    assert moe.gguf.require == {"norm_topk_prob": False, "decoder_sparse_step": 1, "mlp_only_layers": []}
    assert moe.gguf.hparams["expert_used_count"] == "num_experts_per_tok"
    assert moe.gptq.experts_module == "mlp.experts"
    assert moe.gptq.fused_experts == {"gate_up_proj": ("gate", "up"), "down_proj": ("down",)}
    assert moe.gptq.sequential[2] == ("shared_gate", "shared_up", "experts.gate", "experts.up")
    assert moe.expert_tensors(3, {"num_experts": 2})["down"] == [
        "model.layers.3.mlp.experts.0.down_proj.weight", "model.layers.3.mlp.experts.1.down_proj.weight"]
    with pytest.raises(UnsupportedError, match="num_experts"):
        moe.expert_count({})
