"""`xquant gptq` on a mixture of experts (the tiny trained `Qwen2MoeForCausalLM`): each routed expert
quantized with a Hessian from the calibration tokens its router sends it, rarely-chosen experts
rounded to nearest (and counted), the router and the 1-row shared-expert gate left in float.

Checked against independent computations: the routing recomputed with transformers' own model, the
experts' GPTQ recomputed by the core from those tokens, the checkpoint loaded by its real consumer
(GPTQModel, which unfuses transformers 5's fused experts) and compared with the unquantized
reference, and the report. The tiny MoE is barely trained (perplexity ~250-600, nearly flat
predictions), so perplexity cannot tell quantizers apart; KL divergence to the reference can.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_one_line_error, report, run_cli
from helpers import hf_logits
from xquant.demo import tiny
from xquant.evaluate.gptq_reference import load_dequantized
from xquant.io.output import MANIFEST_NAME
from xquant.quant.gptq import GPTQOptions, core, gptq, pack
from xquant.quant.gptq.plan import plan_gptq

SAMPLES, SEQ = 8, 256
EXPERTS, TOP_K, LAYERS = 8, 2, 2
SETS = ("zh", "en", "code")
EVAL_TOKENS = 1024
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # gptqmodel refuses to start on 2 cores without it


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def fp32(moe):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(moe, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def built(moe, tmp_path_factory):
    """name -> GPTQ artifact of the tiny MoE, quantized once per module (in-process)."""
    root = tmp_path_factory.mktemp("moe-gptq")
    cache: dict[str, Path] = {}

    def get(name: str, **opts) -> Path:
        if name not in cache:
            gptq(moe, root / name, GPTQOptions(samples=SAMPLES, seq_len=SEQ, group_size=128, **opts))
            cache[name] = root / name
        return cache[name]

    return get


@pytest.fixture(scope="module")
def eval_ids(moe) -> dict[str, list[int]]:
    tok = tiny.load_tokenizer(moe)
    return {s: tiny.encode_set(tok, s, "eval")[:EVAL_TOKENS] for s in SETS}


def _kl_top1(ref: torch.Tensor, got: torch.Tensor) -> tuple[float, float]:
    p = torch.log_softmax(ref, -1)
    kl = float((p.exp() * (p - torch.log_softmax(got, -1))).sum(-1).mean())
    return kl, float((ref.argmax(-1) == got.argmax(-1)).double().mean())


def _experts(out: Path) -> dict:
    return json.loads((out / MANIFEST_NAME).read_text())["gptq"]["experts"]


def _variant(moe: Path, root: Path, **config) -> Path:
    root.mkdir()
    for f in moe.iterdir():
        if f.name != "config.json":
            (root / f.name).symlink_to(f)
    (root / "config.json").write_text(json.dumps(json.loads((moe / "config.json").read_text()) | config))
    return root


# ---------------------------------------------------------------- the walker on a MoE layer


@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_walker_runs_the_moe_layer_as_transformers_does(moe, tmp_path, norm_topk_prob):
    """The per-expert Linears the walker swaps in compute what transformers' fused experts do,
    behind the model's own router (top-k, and its renormalisation when norm_topk_prob is set)."""
    from transformers import AutoModelForCausalLM

    from xquant.model import open_hf
    from xquant.quant.gptq.walker import LayerWalker, StoredLinear

    src = _variant(moe, tmp_path / "v", norm_topk_prob=norm_topk_prob)
    model = open_hf(src)
    walker = LayerWalker(model.config, model.arch, model.tensors, core.QuantSpec())
    ids = torch.randint(3, 2000, (2, 64), generator=torch.Generator().manual_seed(0))
    layer = walker.load_layer(0)
    # Each expert's linear is its own module (the walker keeps it compact: StoredLinear).
    assert all(type(layer.get_submodule(f"mlp.experts.{e}.down_proj")) is StoredLinear for e in range(EXPERTS))
    out = torch.empty((2, 64, 256))
    with torch.inference_mode():
        walker.forward_all(layer, walker.embed(ids), out)
        want = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)(ids, output_hidden_states=True)
    assert torch.allclose(out, want.hidden_states[1], atol=1e-5, rtol=1e-5)


def test_each_expert_hessian_comes_from_its_routed_tokens(moe, fp32, built):
    """Without true-sequential every Hessian comes from the unquantized layer, so layer 0 can be
    recomputed independently: transformers' model routes the calibration windows, and the core
    quantizes each expert from the tokens routed to it (gate/up: their inputs; down: the
    expert's own intermediate activations). Rarely-routed experts are round-to-nearest, bit for bit."""
    out = built("4bit-one-pass", true_sequential=False)
    experts = _experts(out)
    windows = plan_gptq(moe, out.parent / "unused", GPTQOptions(samples=SAMPLES, seq_len=SEQ)).calibration.windows
    seen = {}
    hook = fp32.model.layers[0].mlp.register_forward_pre_hook(lambda _m, args: seen.setdefault("x", args[0]))
    with torch.inference_mode():
        fp32(windows)
    hook.remove()
    mlp = fp32.model.layers[0].mlp
    x = seen["x"].reshape(-1, 256)
    with torch.inference_mode():
        chosen = mlp.gate(x)[2]  # [tokens, top-k] as the model itself routes them
    tokens = torch.bincount(chosen.flatten(), minlength=EXPERTS).tolist()
    assert experts["per_layer"][0]["tokens"] == tokens
    for layer in experts["per_layer"]:
        assert sum(layer["tokens"]) == SAMPLES * SEQ * TOP_K  # every token reaches exactly k experts
    rtn = [e for e in range(EXPERTS) if tokens[e] < experts["min_tokens"]]
    assert experts["per_layer"][0]["rtn"] == rtn and 0 < len(rtn) < EXPERTS  # the tiny router is lopsided
    spec, ckpt = core.QuantSpec(bits=4, group_size=128), load_file(out / "model.safetensors")
    source = load_file(moe / "model.safetensors")
    for e in range(EXPERTS):
        head = f"model.layers.0.mlp.experts.{e}."
        routed = x[(chosen == e).any(-1)]
        w_gate, w_up, w_down = (source[f"{head}{r}_proj.weight"] for r in ("gate", "up", "down"))
        inter = torch.nn.functional.silu(routed @ w_gate.T) * (routed @ w_up.T)
        for role, w, inputs in (("gate", w_gate, routed), ("up", w_up, routed), ("down", w_down, inter)):
            stored = {s: ckpt[f"{head}{role}_proj.{s}"] for s in pack.SUFFIXES}
            if e in rtn:
                want = pack.pack_linear(core.rtn_quantize(w, spec), 4)
                assert all(torch.equal(stored[s], want[s]) for s in pack.SUFFIXES), (e, role)
                continue
            H = 2 * inputs.T.double() @ inputs.double() / inputs.shape[0]
            qw = core.gptq_quantize(w, H.float(), spec)
            codes = pack.unpack_qweight(stored["qweight"], 4).t()
            # The same up to float summation order in H: a rounding tie may rarely flip.
            assert (codes == qw.codes.long()).double().mean() > 0.995, (e, role)
            assert not torch.equal(codes, core.rtn_quantize(w, spec).codes.long()), (e, role)


# ---------------------------------------------------------------- the artifact


def test_checkpoint_layout_per_expert_and_float_router(moe, built):
    out = built("4bit")
    ckpt, source = load_file(out / "model.safetensors"), load_file(moe / "model.safetensors")
    for i in range(LAYERS):
        for e in range(EXPERTS):
            for r, shape in (("gate", (32, 256)), ("up", (32, 256)), ("down", (32, 256))):
                t = ckpt[f"model.layers.{i}.mlp.experts.{e}.{r}_proj.qweight"]
                assert t.dtype == torch.int32 and tuple(t.shape) == shape
                assert f"model.layers.{i}.mlp.experts.{e}.{r}_proj.weight" not in ckpt
        for keep in ("mlp.gate.weight", "mlp.shared_expert_gate.weight"):  # as GPTQModel: not quantized
            name = f"model.layers.{i}.{keep}"
            assert ckpt[name].dtype == source[name].dtype and torch.equal(ckpt[name], source[name])
        assert f"model.layers.{i}.mlp.shared_expert.down_proj.qweight" in ckpt
    assert len(ckpt) == 265 and sum(n.endswith(".qweight") for n in ckpt) == LAYERS * (4 + 3 + 3 * EXPERTS)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == json.loads((out / "quantize_config.json").read_text())
    experts = _experts(out)
    assert experts["total"] == LAYERS * EXPERTS and experts["min_tokens"] == 32
    assert experts["rtn"] == sum(len(layer["rtn"]) for layer in experts["per_layer"]) > 0


# GPTQModel.load swaps transformers' Qwen2-MoE block class for its unfused one process-wide, so the
# consumer runs in its own process (as the report's evaluation does) and leaves this one untouched.
_GPTQMODEL = """
import sys, torch
from gptqmodel import GPTQModel
out, ids_file, result = sys.argv[1:]
model = GPTQModel.load(out, device="cpu", dtype=torch.float32).model.eval()
mlp = model.model.layers[0].mlp
kinds = {"expert": type(mlp.experts[3].down_proj).__name__, "q": type(model.model.layers[0].self_attn.q_proj).__name__,
         "shared_gate": type(mlp.shared_expert_gate).__name__, "shared_gate_dtype": str(mlp.shared_expert_gate.weight.dtype)}
logits = {}
with torch.inference_mode():
    for name, ids in torch.load(ids_file).items():
        logits[name] = torch.cat([model(torch.tensor([ids[j:j + 512]])).logits[0] for j in range(0, len(ids), 512)])
torch.save({"kinds": kinds, "logits": logits}, result)
"""


def test_gptqmodel_loads_it_and_matches_the_reference(moe, fp32, built, eval_ids, tmp_path):
    """GPTQModel.load (its qwen2_moe definition unfuses transformers 5's experts into per-expert
    modules) runs the checkpoint with its own kernels; transformers' from_pretrained cannot (it
    finds no module for per-expert tensors: see the GPTQ runtime)."""
    import subprocess
    import sys

    out = built("4bit")
    torch.save(eval_ids, tmp_path / "ids.pt")
    proc = subprocess.run([sys.executable, "-c", _GPTQMODEL, str(out), str(tmp_path / "ids.pt"), str(tmp_path / "r.pt")],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = torch.load(tmp_path / "r.pt")
    kinds = result["kinds"]
    assert kinds["expert"] not in ("Linear", "Qwen2MoeExperts") and kinds["q"] == kinds["expert"]
    assert (kinds["shared_gate"], kinds["shared_gate_dtype"]) == ("Linear", "torch.float32")  # left in float
    deq = load_dequantized(out)
    figures = []
    for s in SETS:
        ref, want = (hf_logits(m, eval_ids[s], torch.float64) for m in (fp32, deq))
        got = result["logits"][s].double()
        kl_kernel, _ = _kl_top1(want, got)
        kl, top1 = _kl_top1(ref, got)
        figures.append(f"{s} KL {kl:.2e} top-1 {100 * top1:.1f}% (kernel vs dequantized KL {kl_kernel:.1e})")
        assert kl_kernel < 1e-4 and kl < 0.01 and top1 > 0.9, (s, kl_kernel, kl, top1)
    report(f"MoE gptq 4-bit g128 in GPTQModel ({kinds['expert']}) vs fp32, {EVAL_TOKENS} tokens: " + "; ".join(figures))


def test_per_expert_hessians_beat_round_to_nearest(moe, fp32, built, eval_ids):
    """3-bit: GPTQ with per-expert Hessians against the same run with every expert rounded to
    nearest (min-expert-tokens above any count), and against round-to-nearest everywhere."""
    ours = load_dequantized(built("3bit", bits=3))
    experts_rtn_dir = built("3bit-experts-rtn", bits=3, min_expert_tokens=10**9)
    assert _experts(experts_rtn_dir)["rtn"] == LAYERS * EXPERTS
    experts_rtn = load_dequantized(experts_rtn_dir)
    from transformers import AutoModelForCausalLM

    spec = core.QuantSpec(bits=3, group_size=128)
    rtn = AutoModelForCausalLM.from_pretrained(moe, dtype=torch.float32).eval()
    for name, module in rtn.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name and module.out_features > 1:
            module.weight.data = core.rtn_quantize(module.weight.data, spec).weight
        if hasattr(module, "gate_up_proj"):  # transformers' fused experts (unless GPTQModel unfused the class)
            for e in range(EXPERTS):
                gate, up = module.gate_up_proj.data[e].chunk(2)
                module.gate_up_proj.data[e] = torch.cat([core.rtn_quantize(w, spec).weight for w in (gate, up)])
                module.down_proj.data[e] = core.rtn_quantize(module.down_proj.data[e], spec).weight
    kl = {name: {} for name in ("gptq", "experts RTN", "RTN")}
    for s in SETS:
        ref = hf_logits(fp32, eval_ids[s], torch.float64)
        for name, model in (("gptq", ours), ("experts RTN", experts_rtn), ("RTN", rtn)):
            kl[name][s] = _kl_top1(ref, hf_logits(model, eval_ids[s], torch.float64))[0]
    report("MoE 3-bit g128 mean KL to fp32 (zh/en/code): " + "; ".join(
        f"{name} " + "/".join(f"{v:.1e}" for v in row.values()) for name, row in kl.items()))
    for s in SETS:
        assert kl["gptq"][s] < kl["experts RTN"][s] < kl["RTN"][s], (s, kl)


def test_report_counts_round_to_nearest_experts(moe, built, tmp_path):
    from xquant.report import build_report

    out = built("4bit")
    result = build_report(moe, [out], tmp_path / "report", ["en"], [], max_tokens=256, window=256)
    row = next(r for r in result["artifacts"] if r["name"] == out.name)
    assert "error" not in row, row
    assert row["kind"] == "gptq" and row["engine"].startswith("gptqmodel")
    assert row["sets"]["en"]["kl"] < 0.01
    x = _experts(out)
    assert f"experts by round-to-nearest: {x['rtn']} of {x['total']}" in (tmp_path / "report" / "report.md").read_text()


# ---------------------------------------------------------------- plan and bad input


def test_dry_run_plans_every_expert(moe, tmp_path):
    proc = run_cli("gptq", moe, tmp_path / "out", "--dry-run", "--json", "--samples", "2", "--seq-len", "64",
                   check=True)
    plan = json.loads(proc.stdout)
    names = [row["tensor"] for row in plan["tensors"]]
    assert len(names) == 265 and "model.layers.1.mlp.experts.7.down_proj.qzeros" in names
    assert "model.layers.1.mlp.shared_expert_gate.weight" in names
    summary = json.dumps(plan)
    assert "8 per layer (top-2), 48 linears" in summary and "mlp.shared_expert_gate.weight" in summary
    assert not (tmp_path / "out").exists()


def test_bad_moe_options(moe, tmp_path):
    proc = run_cli("gptq", moe, tmp_path / "a", "--min-expert-tokens", "0", "--seq-len", "64")
    assert_one_line_error(proc, "--min-expert-tokens 0")
    proc = run_cli("gptq", moe, tmp_path / "b", "--engine", "optimum", "--seq-len", "64")
    assert_one_line_error(proc, "--engine optimum", "experts")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
