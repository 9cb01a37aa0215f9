"""`xquant gptq` on real files: the v1 layout, the algorithm against its own dequantizer, the
checkpoint in its consumer (transformers + optimum + gptqmodel), perplexity against
round-to-nearest, resume after a crash, the optimum engine, and bad input.

Accuracy is measured on the tiny model reparametrized with activation outlier channels
(gptq_fixtures.py: same function, real-LLM-like sensitivity); the plain tiny model shrugs off
4-bit noise, so GPTQ and RTN could not be told apart on it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import assert_one_line_error, report, run_cli
from gptq_fixtures import outlier_model_dir
from helpers import kill_after_gptq_layer, write_safetensors
from xquant.demo import tiny
from xquant.evaluate.gptq_reference import load_dequantized
from xquant.evaluate.perplexity import hf_logits_fn, perplexity
from xquant.io.output import MANIFEST_NAME
from xquant.io.readers import open_hf_tensors
from xquant.quant.gptq import GPTQOptions, core, gptq, pack
from xquant.quant.gptq.plan import plan_gptq
from xquant.quant.gptq.state import state_dir_for
from xquant.quant.gptq.walker import LayerWalker

SAMPLES, SEQ = 32, 256
EVAL_SETS = ("zh", "en", "code")
EVAL_TOKENS = 4096  # the first 8 windows of 512 of each held-out set (GPTQ's margins are wide)
CONFIGS = {f"4bit-g{g}-{'sym' if s else 'asym'}{'-act' if a else ''}": dict(bits=4, group_size=g, sym=s, desc_act=a)
           for g in (32, 128) for s in (True, False) for a in (False, True)}
# Subprocesses get one torch thread, like the in-process runs below: results are then bitwise
# comparable across the two, and on a busy 2-core machine one thread is also much faster.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # gptqmodel refuses to start on 2 cores without it


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sensitive(tiny_model) -> Path:
    return outlier_model_dir()


@pytest.fixture(scope="module")
def eval_ids(sensitive) -> dict[str, list[int]]:
    tok = tiny.load_tokenizer(sensitive)
    return {s: tiny.encode_set(tok, s, "eval")[:EVAL_TOKENS] for s in EVAL_SETS}


def _fp32(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _ppl(model, eval_ids) -> dict[str, float]:
    return {s: perplexity(hf_logits_fn(model), ids, tiny.SPEC.context) for s, ids in eval_ids.items()}


@pytest.fixture(scope="module")
def fp32_ppl(sensitive, eval_ids) -> dict[str, float]:
    return _ppl(_fp32(sensitive), eval_ids)


@pytest.fixture(scope="module")
def built(sensitive, tmp_path_factory):
    """name -> GPTQ artifact of the sensitive model, quantized once per module (in-process)."""
    root = tmp_path_factory.mktemp("gptq")
    cache: dict[str, Path] = {}

    def get(name: str, **opts) -> Path:
        if name not in cache:
            gptq(sensitive, root / name, GPTQOptions(samples=SAMPLES, seq_len=SEQ, **opts))
            cache[name] = root / name
        return cache[name]

    return get


@pytest.fixture(scope="module")
def rtn_ppl(sensitive, eval_ids):
    """Perplexity of round-to-nearest at (bits, group size, sym), computed once per setting."""
    cache: dict[tuple, dict[str, float]] = {}

    def get(bits: int, group_size: int, sym: bool = True) -> dict[str, float]:
        key = (bits, group_size, sym)
        if key not in cache:
            model = _fp32(sensitive)
            for name, module in model.named_modules():
                if isinstance(module, torch.nn.Linear) and ".layers." in name:
                    module.weight.data = core.rtn_quantize(module.weight.data, core.QuantSpec(*key)).weight
            cache[key] = _ppl(model, eval_ids)
        return cache[key]

    return get


def _check_core_reproduced(model_dir: Path, out: Path, opts: dict) -> None:
    """(a) Layer 0's first group recomputed by the core from the same calibration equals the
    checkpoint's tensors, and the independent dequantizer gives back the core's weights bit for bit."""
    plan = plan_gptq(model_dir, out.parent / "unused", GPTQOptions(samples=SAMPLES, seq_len=SEQ, **opts))
    arch, reader, spec = plan.model.arch, plan.model.tensors, plan.options.spec()
    walker = LayerWalker(plan.model.config, arch, reader, spec, act_dtype=plan.act_dtype)
    layer = walker.load_layer(0)
    group = arch.sequential[0]  # q/k/v: their inputs do not depend on any other quantized linear
    head = f"{arch.layers_module}.0."
    modules = {r: layer.get_submodule(arch.layer_tensor(r, 0)[len(head):].removesuffix(".weight")) for r in group}
    hessians = walker.collect_hessians(layer, walker.embed(plan.calibration.windows), modules)
    ckpt = open_hf_tensors(out)
    for role in group:
        name = arch.layer_tensor(role, 0)
        prefix = name.removesuffix(".weight")
        qw = core.gptq_quantize(reader.get(name), hessians[role], spec, name)
        for suffix, t in pack.pack_linear(qw, spec.bits).items():
            assert torch.equal(ckpt.get(f"{prefix}.{suffix}"), t), (name, suffix)
        deq = pack.dequantize(*(ckpt.get(f"{prefix}.{s}") for s in pack.SUFFIXES), bits=spec.bits)
        assert torch.equal(deq, qw.weight), name
        assert not torch.equal(deq, reader.get(name).float())


def _check_consumer(out: Path, reference, eval_ids) -> str:
    """(b) transformers (+ optimum + gptqmodel) loads the checkpoint; its logits match the
    dequantized reference. Returns the kernel class gptqmodel chose."""
    model = _fp32(out)
    kernel = type(model.model.layers[0].self_attn.q_proj).__name__
    assert kernel != "Linear", "transformers did not load GPTQ modules"
    ids = torch.tensor([eval_ids[s][:128] for s in EVAL_SETS])
    with torch.inference_mode():
        got, want = model(ids).logits, reference(ids).logits
    assert (got - want).abs().max() < 0.01 * want.abs().max(), float((got - want).abs().max())
    return kernel


# ---------------------------------------------------------------- layout and core, no model


def test_v1_layout_known_words():
    assert pack.pack_along(torch.arange(8)[:, None], 4, 0).item() == 0x76543210
    assert pack.pack_along(torch.arange(4)[:, None] + 0x7C, 8, 0).item() == 0x7F7E7D7C
    assert pack.pack_along(torch.tensor([[1], [2], [3]] + [[0]] * 13), 2, 0).item() == 0b111001
    # 3-bit: 32 codes fill 3 words; code 10 straddles words 0|1, code 21 words 1|2.
    v = torch.zeros(32, 1, dtype=torch.long)
    v[10] = 0b101
    assert pack.pack_along(v, 3, 0)[:, 0].tolist() == [1 << 30, 1, 0]
    v[10], v[21] = 0, 0b111
    assert pack.pack_along(v, 3, 0)[:, 0].tolist() == [0, -(1 << 31), 0b11]
    # v1 zero points are stored minus one: symmetric 4-bit (zero 8) is the familiar 0x77777777.
    assert pack.pack_zeros_v1(torch.full((1, 8), 8), 4).item() == 0x77777777
    assert pack.pack_zeros_v1(torch.full((1, 4), 128), 8).item() == 0x7F7F7F7F
    g = torch.Generator().manual_seed(0)
    for bits in core.BITS:
        codes = torch.randint(0, 2 ** bits, (64, 96), generator=g)
        assert torch.equal(pack.unpack_qweight(pack.pack_along(codes, bits, 0), bits), codes)
        zeros = torch.randint(0, 2 ** bits, (4, 96), generator=g)  # 0 included: the packed borrow
        assert torch.equal(pack.unpack_qzeros_v1(pack.pack_zeros_v1(zeros, bits), bits), zeros)


def test_core_exact_groups_and_damping():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2048, 128, generator=g) @ torch.randn(128, 128, generator=g)
    h = 2 * x.t() @ x / x.shape[0]
    w = torch.randn(64, 128, generator=g)
    for bits in core.BITS:
        for spec in (core.QuantSpec(bits, 32, True, False), core.QuantSpec(bits, 32, False, True),
                     core.QuantSpec(bits, 64, False, True, static_groups=True), core.QuantSpec(bits, -1, True)):
            qw = core.gptq_quantize(w, h, spec, "w")
            t = pack.pack_linear(qw, bits)
            assert torch.equal(pack.dequantize(*(t[s] for s in pack.SUFFIXES), bits=bits), qw.weight)
            assert int(qw.zeros.min()) >= 1 and int(qw.zeros.max()) <= spec.maxq
            width = 128 if spec.group_size == -1 else spec.group_size
            assert torch.bincount(qw.g_idx.long()).tolist() == [width] * (128 // width)
            if spec.static_groups or not spec.desc_act:
                assert torch.equal(qw.g_idx, (torch.arange(128) // width).to(torch.int32))
            rtn = core.rtn_quantize(w, spec).weight
            assert ((qw.weight - w) @ x.t()).pow(2).mean() < ((rtn - w) @ x.t()).pow(2).mean()
    # A slightly indefinite "Hessian": damping doubles until the factorisation succeeds.
    bad = torch.tensor([[1.0, 1.05], [1.05, 1.0]])
    qw = core.gptq_quantize(torch.randn(8, 2, generator=g), bad, core.QuantSpec(4, -1, damp=0.01), "x")
    assert qw.damp == 0.08
    with pytest.raises(core.HessianError, match="layer.q.*NaN"):
        core.gptq_quantize(w, h * float("nan"), core.QuantSpec(4, 32), "layer.q")


def test_walker_matches_transformers_and_fixture_is_the_same_function(sensitive, tiny_model):
    from xquant.model import open_hf

    model = open_hf(sensitive)
    walker = LayerWalker(model.config, model.arch, model.tensors, core.QuantSpec())
    ids = torch.randint(3, 2000, (3, 64), generator=torch.Generator().manual_seed(0))
    h = walker.embed(ids)
    with torch.inference_mode():
        hidden = _fp32(sensitive)(ids, output_hidden_states=True).hidden_states
        for i in range(model.config["num_hidden_layers"] - 1):
            out = torch.empty_like(h)
            walker.forward_all(walker.load_layer(i), h, out)
            assert torch.allclose(out, hidden[i + 1], atol=1e-4, rtol=1e-4), i
            h = out
        assert torch.allclose(_fp32(sensitive)(ids).logits, _fp32(tiny_model)(ids).logits, atol=1e-3)


def test_narrow_layer_runs_on_one_thread_and_restores_the_count(sensitive):
    """The tiny layers' forward passes are too short to share out (walker.run_layer): every hooked
    forward of a narrow layer sees one thread, and the caller's count is back afterwards."""
    from xquant.model import open_hf

    model = open_hf(sensitive)
    walker = LayerWalker(model.config, model.arch, model.tensors, core.QuantSpec())
    seen = []
    cls = walker.layer_cls
    original = cls.forward

    def forward(self, *args, **kwargs):
        seen.append(torch.get_num_threads())
        return original(self, *args, **kwargs)

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        cls.forward = forward
        ids = torch.randint(3, 2000, (2, 64), generator=torch.Generator().manual_seed(0))
        walker.run_layer(0, walker.embed(ids))
        assert torch.get_num_threads() == 2
    finally:
        cls.forward = original
        torch.set_num_threads(before)
    assert seen and set(seen) == {1}, seen


# ---------------------------------------------------------------- quantized models


@pytest.mark.parametrize("name", list(CONFIGS))
def test_gptq_4bit(name, sensitive, built, eval_ids, fp32_ppl, rtn_ppl):
    opts = CONFIGS[name]
    out = built(name, **opts)
    _check_core_reproduced(sensitive, out, opts)
    reference = load_dequantized(out)
    kernel = _check_consumer(out, reference, eval_ids)
    got = _ppl(reference, eval_ids)
    rtn = rtn_ppl(4, opts["group_size"], opts["sym"])
    report(f"gptq {name} (kernel {kernel}): ppl " + ", ".join(
        f"{s} {got[s]:.2f} vs RTN {rtn[s]:.2f} (fp32 {fp32_ppl[s]:.2f})" for s in EVAL_SETS))
    for s in EVAL_SETS:
        assert got[s] < rtn[s], (s, got[s], rtn[s])
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config == json.loads((out / "quantize_config.json").read_text())
    assert (config["quant_method"], config["checkpoint_format"], config["bits"], config["group_size"],
            config["sym"], config["desc_act"]) == ("gptq", "gptq", 4, opts["group_size"], opts["sym"], opts["desc_act"])
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["calibration"]["samples"] == SAMPLES and manifest["calibration"]["sets"][0]["name"] == "mixed.calib"
    assert (out / "tokenizer.model").read_bytes() == (sensitive / "tokenizer.model").read_bytes()


def test_8bit_within_one_percent_of_fp32(sensitive, built, eval_ids, fp32_ppl):
    out = built("8bit-g128", bits=8, group_size=128)
    reference = load_dequantized(out)
    kernel = _check_consumer(out, reference, eval_ids)
    got = _ppl(reference, eval_ids)
    report(f"gptq 8bit-g128 (kernel {kernel}): ppl " + ", ".join(f"{s} {got[s]:.2f} vs fp32 {fp32_ppl[s]:.2f}"
                                                                   for s in EVAL_SETS))
    for s in EVAL_SETS:
        assert got[s] < 1.01 * fp32_ppl[s], (s, got[s], fp32_ppl[s])


@pytest.mark.parametrize("name,opts", [
    ("3bit-g128-act-static", dict(bits=3, group_size=128, desc_act=True, static_groups=True)),
    ("2bit-g32-asym", dict(bits=2, group_size=32, sym=False)),
])
def test_3bit_and_2bit(name, opts, sensitive, built, eval_ids, fp32_ppl, rtn_ppl):
    out = built(name, **opts)
    reference = load_dequantized(out)
    kernel = _check_consumer(out, reference, eval_ids)
    got = _ppl(reference, eval_ids)
    rtn = rtn_ppl(opts["bits"], opts["group_size"], opts.get("sym", True))
    report(f"gptq {name} (kernel {kernel}): ppl " + ", ".join(
        f"{s} {got[s]:.2f} vs RTN {rtn[s]:.2f} (fp32 {fp32_ppl[s]:.2f})" for s in EVAL_SETS))
    for s in EVAL_SETS:
        assert got[s] < rtn[s]
    if opts.get("static_groups"):  # act-order with static groups keeps g_idx in column order
        g_idx = open_hf_tensors(out).get("model.layers.0.mlp.down_proj.g_idx")
        assert torch.equal(g_idx, (torch.arange(768) // 128).to(torch.int32))


# ---------------------------------------------------------------- resume, engines, CLI


def test_resume_after_crash_is_byte_identical(sensitive, built, tmp_path):
    """SIGKILL once layer 0 is committed to the resume state, then --resume: the very bytes of an
    uninterrupted run."""
    name = "4bit-g128-asym-act"
    reference = built(name, **CONFIGS[name])
    out = tmp_path / "resumed"
    args = ["gptq", sensitive, out, "--bits", "4", "--group-size", "128", "--asym", "--desc-act",
            "--samples", str(SAMPLES), "--seq-len", str(SEQ)]
    done = kill_after_gptq_layer(args, out, layer=0, env=ONE_THREAD)
    assert done < 3, "the run committed every layer before the kill landed: nothing left to resume"
    state = state_dir_for(out)
    assert not out.exists()
    assert sorted(p.name for p in state.iterdir() if not p.name.startswith(".")) == [
        f"inputs-{done + 1:05d}.safetensors", *(f"layer-{i:05d}.safetensors" for i in range(done + 1)), "state.json"]
    assert_one_line_error(run_cli(*args, env=ONE_THREAD), "resume state", "--resume")
    run_cli(*args, "--resume", env=ONE_THREAD, check=True)
    assert not state.exists() and {p.name for p in tmp_path.iterdir()} == {"resumed"}
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(p.name for p in reference.iterdir())
    for f in files:
        if f != MANIFEST_NAME:
            assert (out / f).read_bytes() == (reference / f).read_bytes(), f
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["gptq"]["resumed_at_layer"] == done + 1 and len(manifest["gptq"]["layers"]) == 4


def test_optimum_engine_side_by_side(sensitive, tmp_path, eval_ids, fp32_ppl):
    pytest.importorskip("gptqmodel")
    opts = dict(bits=4, group_size=128, samples=16, seq_len=128)
    ours = gptq(sensitive, tmp_path / "xquant", GPTQOptions(**opts))
    theirs = gptq(sensitive, tmp_path / "optimum", GPTQOptions(**opts, engine="optimum"))
    config = json.loads((theirs.out / "config.json").read_text())["quantization_config"]
    assert config["format"] == "gptq" and config["act_group_aware"] is True  # the same order as xquant's default
    ppl = {}
    for engine, result in (("xquant", ours), ("optimum", theirs)):
        reference = load_dequantized(result.out)
        _check_consumer(result.out, reference, eval_ids)
        ppl[engine] = _ppl(reference, eval_ids)
    report("gptq 4bit-g128 16x128 engines: " + ", ".join(
        f"{s} xquant {ppl['xquant'][s]:.2f} ({ours.seconds:.0f} s) / optimum {ppl['optimum'][s]:.2f} "
        f"({theirs.seconds:.0f} s)" for s in EVAL_SETS))
    for s in EVAL_SETS:
        assert abs(ppl["xquant"][s] - ppl["optimum"][s]) < 0.02 * fp32_ppl[s]


def test_optimum_engine_missing_package(sensitive, tmp_path):
    blocker = tmp_path / "block" / "gptqmodel"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('blocked by the test')\n")
    proc = run_cli("gptq", sensitive, tmp_path / "out", "--engine", "optimum", "--samples", "4", "--seq-len", "64",
                   env={"PYTHONPATH": str(tmp_path / "block")})
    assert_one_line_error(proc, "--engine optimum", "'gptqmodel'", "pip install gptqmodel")
    assert not (tmp_path / "out").exists()


def test_dry_run_writes_nothing(sensitive, tmp_path):
    out = tmp_path / "planned"
    proc = run_cli("gptq", sensitive, out, "--bits", "3", "--group-size", "32", "--samples", "8", "--seq-len", "128",
                   "--dry-run", "--json", env=ONE_THREAD, check=True)
    plan = json.loads(proc.stdout)
    rows = {r["tensor"]: r for r in plan["tensors"]}
    assert rows["model.layers.0.mlp.down_proj.qweight"]["shape"] == "72x256"  # 768 inputs x 3 bits / 32
    assert rows["model.layers.0.mlp.down_proj.qzeros"]["shape"] == "24x24"
    assert rows["model.layers.0.mlp.down_proj.scales"]["dtype"] == "float16"
    assert "model.layers.0.mlp.down_proj.weight" not in rows and "lm_head.weight" in rows
    assert "estimated peak memory" in plan["summary"] and "8 x 128 tokens" in plan["summary"]["calibration"]
    assert list(tmp_path.iterdir()) == []


def test_bad_input(sensitive, built, tmp_path):
    out = tmp_path / "out"
    base = ["gptq", sensitive, out, "--samples", "4", "--seq-len", "64"]
    assert_one_line_error(run_cli(*base, "--bits", "5"), "--bits 5", "2, 3, 4 or 8")
    assert_one_line_error(run_cli(*base, "--group-size", "96"), "model.layers.0.self_attn.q_proj.weight",
                          "group size 96")
    short = tmp_path / "short.txt"
    short.write_text("Only a few words of calibration text.")
    assert_one_line_error(run_cli(*base, "--calibration", str(short), "--seq-len", "256"),
                          "short.txt", "fewer than one sequence of 256")
    quantized = built("4bit-g128-sym", **CONFIGS["4bit-g128-sym"])
    assert_one_line_error(run_cli("gptq", quantized, out), "config.json", "already quantized")
    assert {p.name for p in tmp_path.iterdir()} == {"short.txt"}
    # A layer whose inputs are not finite: no damping can help; the error names the layer and
    # nothing is left (a failed run removes its resume state; only an interruption keeps it).
    broken = tmp_path / "broken"
    broken.mkdir()
    reader = open_hf_tensors(sensitive)
    tensors = {n: reader.get(n) for n in reader.names()}
    tensors["model.layers.0.input_layernorm.weight"][3] = float("inf")
    write_safetensors(broken, tensors)
    for f in sensitive.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors"):
            shutil.copy2(f, broken / f.name)
    proc = run_cli("gptq", broken, out, "--samples", "4", "--seq-len", "64", env=ONE_THREAD)
    assert_one_line_error(proc, "model.layers.0.self_attn.q_proj.weight", "Hessian")
    assert {p.name for p in tmp_path.iterdir()} == {"short.txt", "broken"}


# ---------------------------------------------------------------- group-aware order (issue 16)


def test_group_aware_order_keeps_groups_whole():
    """The group-aware visiting order: each run of `group` positions is one original group, groups
    by decreasing largest diagonal, columns inside by decreasing diagonal; the result is a plain
    v1 layout (g_idx = i // group), exactly dequantized, and act-order takes precedence."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2048, 128, generator=g) * torch.exp(torch.randn(128, generator=g))
    h = 2 * x.t() @ x / x.shape[0]
    w = torch.randn(64, 128, generator=g)
    diag = h.diagonal()
    perm = core.column_order(diag, core.QuantSpec(4, 32))
    assert sorted(perm.tolist()) == list(range(128))
    runs = perm.view(4, 32)
    assert all(len({int(c) // 32 for c in run}) == 1 for run in runs)
    assert all(bool((diag[run][:-1] >= diag[run][1:]).all()) for run in runs)
    tops = [float(diag[run].max()) for run in runs]
    assert tops == sorted(tops, reverse=True) and not torch.equal(perm, torch.arange(128))
    assert torch.equal(core.column_order(diag, core.QuantSpec(4, 32, desc_act=True)),
                       torch.argsort(diag, descending=True, stable=True))
    assert torch.equal(core.column_order(diag, core.QuantSpec(4, 32, act_group_aware=False)), torch.arange(128))
    for bits in core.BITS:
        for spec in (core.QuantSpec(bits, 32), core.QuantSpec(bits, 32, False),
                     core.QuantSpec(bits, 64, static_groups=True), core.QuantSpec(bits, -1)):
            qw = core.gptq_quantize(w, h, spec, "w")
            width = spec.group_width(128)
            assert torch.equal(qw.g_idx, (torch.arange(128) // width).to(torch.int32))
            t = pack.pack_linear(qw, bits)
            assert torch.equal(pack.dequantize(*(t[s] for s in pack.SUFFIXES), bits=bits), qw.weight)
            rtn = core.rtn_quantize(w, spec).weight
            assert ((qw.weight - w) @ x.t()).pow(2).mean() < ((rtn - w) @ x.t()).pow(2).mean()


def test_act_group_aware_option_wiring():
    from xquant.quant.gptq import plan as gptq_plan

    default = GPTQOptions()
    assert default.act_group_aware and default.spec().act_group_aware
    assert gptq_plan.quantize_config(default)["meta"]["act_group_aware"] is True
    assert gptq_plan.quantize_config(default)["desc_act"] is False
    act = GPTQOptions(desc_act=True)  # act-order wins: the finer order, GPTQModel's choice too
    assert not act.spec().act_group_aware and act.spec().desc_act
    assert gptq_plan.quantize_config(act)["meta"]["act_group_aware"] is False
    plain = GPTQOptions.from_table({"act_group_aware": False}, "recipe.toml [gptq]")
    assert not plain.spec().act_group_aware


def _kl_to(reference, model, eval_ids) -> float:
    """Mean over held-out tokens of KL(reference || model), windows of the model's context."""
    from xquant.evaluate.perplexity import windows

    kl, n = 0.0, 0
    with torch.inference_mode():
        for ids in eval_ids.values():
            for w in windows(ids, tiny.SPEC.context):
                t = torch.tensor([w])
                p = torch.log_softmax(reference(t).logits[0, :-1].double(), -1)
                q = torch.log_softmax(model(t).logits[0, :-1].double(), -1)
                kl += float((p.exp() * (p - q)).sum())
                n += len(w) - 1
    return kl / n


def test_group_aware_default_beats_plain_order(sensitive, built, eval_ids, fp32_ppl, rtn_ppl):
    """The default (group-aware order) against --no-act-group-aware on the sensitive model: lower
    held-out KL to fp32 and perplexity, still a plain desc_act=false v1 checkpoint that loads in
    transformers + optimum + gptqmodel, and better than round-to-nearest on every set."""
    import math

    gar = built("4bit-g128-sym", **CONFIGS["4bit-g128-sym"])
    plain = built("4bit-g128-sym-plain", **CONFIGS["4bit-g128-sym"], act_group_aware=False)
    config = json.loads((gar / "quantize_config.json").read_text())
    assert config["desc_act"] is False and config["meta"]["act_group_aware"] is True
    assert json.loads((plain / "quantize_config.json").read_text())["meta"]["act_group_aware"] is False
    ckpt = open_hf_tensors(gar)
    for name in ckpt.names():
        if name.endswith(".g_idx"):
            g_idx = ckpt.get(name)
            assert torch.equal(g_idx, (torch.arange(g_idx.numel()) // 128).to(torch.int32)), name
    fp32 = _fp32(sensitive)
    rtn = rtn_ppl(4, 128, True)
    got = {}
    for label, out in (("group-aware", gar), ("plain", plain)):
        reference = load_dequantized(out)
        kernel = _check_consumer(out, reference, eval_ids)
        ppl = _ppl(reference, eval_ids)
        got[label] = (ppl, _kl_to(fp32, reference, eval_ids))
        report(f"gptq 4bit-g128 {label} order (kernel {kernel}): KL {got[label][1]:.2e}, ppl " + ", ".join(
            f"{s} {ppl[s]:.2f} (RTN {rtn[s]:.2f}, fp32 {fp32_ppl[s]:.2f})" for s in EVAL_SETS))
    (ppl_gar, kl_gar), (ppl_plain, kl_plain) = got["group-aware"], got["plain"]
    assert kl_gar < kl_plain, (kl_gar, kl_plain)
    assert sum(math.log(ppl_gar[s]) for s in EVAL_SETS) < sum(math.log(ppl_plain[s]) for s in EVAL_SETS)
    for s in EVAL_SETS:
        assert ppl_gar[s] < rtn[s], (s, ppl_gar[s], rtn[s])
