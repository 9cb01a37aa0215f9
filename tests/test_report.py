"""`xquant report` and `xquant verify` over real artifacts of every format, made by xquant itself."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from conftest import assert_one_line_error, report, run_cli

MAX_TOKENS = "1024"


@pytest.fixture(scope="session")
def artifacts(tiny_model, tmp_path_factory) -> dict[str, Path]:
    """One artifact of each format, made through the CLI as a user would."""
    d = tmp_path_factory.mktemp("artifacts")
    made = {
        "int8": (["int8", tiny_model, d / "int8"], d / "int8"),
        "nf4": (["nf4", tiny_model, d / "nf4"], d / "nf4"),
        "gptq": (["gptq", tiny_model, d / "gptq-4bit", "--bits", "4", "--group-size", "32",
                  "--samples", "16", "--seq-len", "256"], d / "gptq-4bit"),
        "q8_0": (["gguf", tiny_model, d / "tiny-q8_0.gguf", "--outtype", "q8_0"], d / "tiny-q8_0.gguf"),
        "q4_k_m": (["gguf", tiny_model, d / "tiny-q4_k_m.gguf", "--outtype", "q4_k_m"], d / "tiny-q4_k_m.gguf"),
    }
    for args, _ in made.values():
        run_cli(*args, check=True)
    return {k: v for k, (_, v) in made.items()}


@pytest.fixture(scope="session")
def full_report(tiny_model, artifacts, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("report") / "r"
    run_cli("report", tiny_model, *artifacts.values(), "--out", out, "--max-tokens", MAX_TOKENS, check=True)
    return out, json.loads((out / "report.json").read_text())


def test_report_lists_every_artifact_with_sane_figures(full_report, artifacts):
    out, rep = full_report
    rows = {r["name"]: r for r in rep["artifacts"]}
    assert [r["role"] for r in rep["artifacts"]].count("reference") == 1
    assert {p.name for p in artifacts.values()} <= set(rows)
    for r in rep["artifacts"]:
        assert "error" not in r, r
    ref = next(r for r in rep["artifacts"] if r["role"] == "reference")
    for s in rep["eval_sets"]:
        assert ref["sets"][s]["kl"] == 0 and ref["sets"][s]["top1"] == 1.0
        int8 = rows[artifacts["int8"].name]["sets"][s]
        assert abs(int8["ppl"] / ref["sets"][s]["ppl"] - 1) < 0.01, (s, int8["ppl"], ref["sets"][s]["ppl"])
    kinds = {r["kind"] for r in rep["artifacts"]}
    assert kinds == {"hf", "int8", "nf4", "gptq", "gguf"}
    for r in rep["artifacts"]:
        mean_kl = sum(r["sets"][s]["kl"] for s in rep["eval_sets"]) / len(rep["eval_sets"])
        report(f"report: {r['name']:>22} {r['kind']:>5} {r['bits_per_weight']:5.2f} bpw  "
               + "  ".join(f"ppl {s} {r['sets'][s]['ppl']:.2f}" for s in rep["eval_sets"])
               + f"  KL {mean_kl:.5f}  MC {100 * r['mc']['bilingual']['accuracy']:.1f}%  [{r['engine']}]")
    # Smaller artifacts should not be lossless: 4-bit KL above 8-bit KL.
    kl = {k: sum(rows[p.name]["sets"][s]["kl"] for s in rep["eval_sets"]) for k, p in artifacts.items()}
    assert kl["int8"] < kl["nf4"] and kl["q8_0"] < kl["q4_k_m"]
    md = (out / "report.md").read_text()
    for p in artifacts.values():
        assert p.name in md


def test_report_json_matches_schema_and_png_is_an_image(full_report):
    import jsonschema
    from PIL import Image

    from xquant.report import SCHEMA_PATH

    out, rep = full_report
    jsonschema.validate(rep, json.loads(SCHEMA_PATH.read_text()))
    with Image.open(out / "report.png") as im:
        im.verify()
        assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 200


def test_reference_perplexity_equals_transformers_loss(full_report, tiny_model):
    """Same windows, same tokens: exp of transformers' own mean loss over all scored tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from xquant.calib import load_set
    from xquant.evaluate.perplexity import windows

    _, rep = full_report
    ref = next(r for r in rep["artifacts"] if r["role"] == "reference")
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    ids: list[int] = []
    for doc in load_set("en", "eval").documents:
        ids.extend(tok(doc, verbose=False)["input_ids"])
        if len(ids) >= int(MAX_TOKENS):
            break
    ids = ids[: int(MAX_TOKENS)]
    total, count = 0.0, 0
    with torch.inference_mode():
        for w in windows(ids, ref["window"]):
            loss = model(torch.tensor([w]), labels=torch.tensor([w])).loss
            total += float(loss) * (len(w) - 1)
            count += len(w) - 1
    assert math.isclose(math.exp(total / count), ref["sets"]["en"]["ppl"], rel_tol=1e-4)


def test_verify_passes_and_fails_by_tolerance(tiny_model, artifacts):
    ok = json.loads(run_cli("verify", artifacts["int8"], "--reference", tiny_model, "--json", check=True).stdout)
    assert ok["kl"] < 0.05 and ok["top1"] > 0.8
    proc = run_cli("verify", artifacts["q4_k_m"], "--reference", tiny_model, "--tolerance", "0.000001")
    assert_one_line_error(proc, "tiny-q4_k_m.gguf", "exceeds")
    assert proc.returncode == 7


def test_artifact_with_another_tokenizer_gets_no_kl(tiny_model, tmp_path):
    from xquant.demo import tiny

    other = tmp_path / "other-tokenizer"
    shutil.copytree(tiny_model, other)
    for f in ("tokenizer.json", "tokenizer.model"):
        (other / f).unlink()
    lines = tiny.corpus_lines()
    tiny.save_hf_tokenizer(tiny.train_sentencepiece(lines[len(lines) // 3:], tiny.SPEC.vocab_size), other)
    out = tmp_path / "r"
    run_cli("report", tiny_model, other, "--out", out, "--eval", "en", "--max-tokens", "256", "--mc",
            Path(__file__).resolve().parent.parent / "calibration" / "mc" / "bilingual.csv", check=True)
    rep = json.loads((out / "report.json").read_text())
    row = next(r for r in rep["artifacts"] if r["name"] == "other-tokenizer")
    assert "tokenizer differs" in row["sets"]["en"]["kl_skipped"] and "kl" not in row["sets"]["en"]
    assert "tokenizer differs" in (out / "report.md").read_text()


def test_bad_eval_and_mc_inputs(tiny_model, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert_one_line_error(run_cli("report", tiny_model, tiny_model, "--out", tmp_path / "r1", "--eval", empty),
                          "empty.txt", "no text")
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    assert_one_line_error(run_cli("report", tiny_model, tiny_model, "--out", tmp_path / "r2", "--eval", latin),
                          "latin1.txt", "not UTF-8")
    bad_mc = tmp_path / "bad.csv"
    bad_mc.write_text("id,question,option1,option2,answer\n0,q,a,b,A\n")
    assert_one_line_error(run_cli("report", tiny_model, tiny_model, "--out", tmp_path / "r3", "--mc", bad_mc),
                          "bad.csv", "wrong columns")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.csv", "empty.txt", "latin1.txt"]
