"""`xquant report --benchmark` on C-Eval / CMMLU / MMLU directories in their official layouts, the
llama-perplexity divergence summary, the publisher's table and model cards.

The benchmark directories are written here (a few subjects, a few questions each, text written for
this test); accuracies are checked against an independent computation with transformers (the
reference and the int8 artifact) and llama.cpp (the GGUF), divergence statistics against numpy on
per-token values recomputed here.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_one_line_error, report, run_cli

CONTEXT_NOTE = "这是一段为了测试而写的较长背景材料，用来让提示超过上下文长度。"

# (question, A, B, C, D, answer) — written for this test.
ZH = {
    "basic_arithmetic": [
        ("三加四等于多少？", "六", "七", "八", "九", "B"),
        ("十减去二等于多少？", "八", "七", "十二", "六", "A"),
        ("五乘以二等于多少？", "七", "十二", "十", "三", "C"),
        ("九除以三等于多少？", "六", "四", "二", "三", "D"),
        ("一加一等于多少？", "三", "二", "一", "零", "B"),
        ("二乘以三等于多少？", "五", "八", "六", "九", "C"),
    ],
    "daily_life": [
        ("一周有几天？", "五天", "六天", "七天", "八天", "C"),
        ("人们通常用什么喝水？", "杯子", "鞋子", "帽子", "椅子", "A"),
        ("冬天通常比夏天怎样？", "更热", "更冷", "更长", "更亮", "B"),
        ("太阳从哪个方向升起？", "西方", "北方", "南方", "东方", "D"),
        ("下雨时人们常带什么？", "雨伞", "风筝", "钥匙", "书包", "A"),
        ("晚上天空中常见的是什么？", "彩虹", "太阳", "月亮", "白云", "C"),
    ],
}
EN = {
    "elementary_facts": [
        ("How many legs does a spider have?", "six", "eight", "ten", "four", "B"),
        ("Which of these is a primary colour?", "red", "pink", "grey", "brown", "A"),
        ("What do bees make?", "milk", "silk", "honey", "wax paper", "C"),
        ("Which planet do we live on?", "Mars", "Venus", "Jupiter", "Earth", "D"),
        ("How many hours are in a day?", "12", "24", "36", "48", "B"),
        ("Ice is the solid form of what?", "water", "air", "salt", "sand", "A"),
    ],
    "simple_units": [
        ("How many centimetres are in a metre?", "10", "1000", "100", "60", "C"),
        ("How many seconds are in a minute?", "60", "100", "24", "30", "A"),
        ("How many grams are in a kilogram?", "10", "100", "500", "1000", "D"),
        ("How many days are in a leap year?", "365", "366", "364", "360", "B"),
        ("How many months are in a year?", "10", "11", "12", "13", "C"),
        ("How many minutes are in an hour?", "60", "30", "90", "100", "A"),
    ],
}
LIMIT = 3  # scored questions per subject (the first three of each test/val file)
SHOTS = 3  # dev examples per prompt


def _long(q: tuple) -> tuple:
    """The same question behind a long preamble, so that few shots fit a 512-token context."""
    return (CONTEXT_NOTE * 6 + q[0], *q[1:])


def write_ceval(root: Path) -> Path:
    for folder in ("dev", "val"):
        (root / folder).mkdir(parents=True)
    for subject, qs in ZH.items():
        dev, val = qs[3:], qs[:3] + qs[3:4]  # val has 4 rows; --limit keeps 3
        if subject == "daily_life":
            dev = [_long(q) for q in dev]
        for folder, rows in (("dev", dev), ("val", val)):
            with open(root / folder / f"{subject}_{folder}.csv", "w", newline="", encoding="utf-8") as f:
                w = csv.writer(f)
                w.writerow(["id", "question", "A", "B", "C", "D", "answer", "explanation"])
                for i, q in enumerate(rows):
                    w.writerow([i, *q, "因为这样。" if folder == "dev" else ""])
    return root


def write_cmmlu(root: Path) -> Path:
    for folder in ("dev", "test"):
        (root / folder).mkdir(parents=True)
    for subject, qs in ZH.items():
        for folder, rows in (("dev", qs[3:]), ("test", qs[:3])):
            with open(root / folder / f"{subject}.csv", "w", newline="", encoding="utf-8") as f:
                w = csv.writer(f)
                w.writerow(["", "Question", "A", "B", "C", "D", "Answer"])
                for i, q in enumerate(rows):
                    w.writerow([i, *q])
    return root


def write_mmlu(root: Path) -> Path:
    for folder in ("dev", "test"):
        (root / folder).mkdir(parents=True)
    for subject, qs in EN.items():
        for folder, rows in (("dev", qs[3:]), ("test", qs[:3])):
            with open(root / folder / f"{subject}_{folder}.csv", "w", newline="", encoding="utf-8") as f:
                csv.writer(f).writerows(rows)
    return root


# ------------------------------------------------------------------ independent scoring

HEADERS = {
    "ceval": ("以下是中国关于{}考试的单项选择题，请选出其中的正确答案。\n\n", "答案：", ""),
    "cmmlu": ("以下是关于{}的单项选择题，请直接给出正确答案的选项。\n\n", "答案：", ""),
    "mmlu": ("The following are multiple choice questions (with answers) about {}.\n\n", "Answer:", " "),
}


def _block(q, cue):
    return f"{q[0]}\nA. {q[1]}\nB. {q[2]}\nC. {q[3]}\nD. {q[4]}\n{cue}"


def expected_prompts(bench: str) -> list[tuple[str, str, str, list]]:
    """(subject, question, dev examples offered as shots) in file order, as this test builds them."""
    out = []
    subjects = EN if bench == "mmlu" else ZH
    for subject, qs in sorted(subjects.items()):
        dev = qs[3:]
        if bench == "ceval" and subject == "daily_life":
            dev = [_long(q) for q in dev]
        for q in qs[:LIMIT]:
            out.append((subject, q, dev[:SHOTS]))
    return out


def prompt_text(bench: str, subject: str, q, shots) -> str:
    header, cue, sep = HEADERS[bench]
    return (header.format(subject.replace("_", " ")) + "".join(_block(s, cue) + sep + s[5] + "\n\n" for s in shots)
            + _block(q, cue))


def independent_predictions(bench: str, encode, last_logits) -> tuple[dict[str, str], int]:
    """Per subject, the predicted letters: the prompt with as many shots as fit 512 tokens; the
    letters' ids are those that follow the prompt's ids when the letter is appended after the cue."""
    _, _, sep = HEADERS[bench]
    preds: dict[str, str] = {}
    shortened = 0
    for subject, q, shots in expected_prompts(bench):
        k = len(shots)
        while k > 0 and len(encode(prompt_text(bench, subject, q, shots[:k]) + sep + "A")) > 512:
            k -= 1
        shortened += k < len(shots)
        text = prompt_text(bench, subject, q, shots[:k])
        base = encode(text)
        letters = []
        for letter in "ABCD":
            full = encode(text + sep + letter)
            assert full[: len(base)] == base
            letters.append(full[len(base)])
        scores = last_logits(base)[letters]
        preds[subject] = preds.get(subject, "") + "ABCD"[int(np.argmax(scores))]
    return preds, shortened


def hf_scorer(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, device_map="cpu", **(
        {} if "quantization_config" in json.loads((path / "config.json").read_text()) else {"dtype": torch.float32}))

    def encode(text):
        return tok(text, verbose=False)["input_ids"]

    @torch.inference_mode()
    def all_logits(ids):
        return model(torch.tensor([ids])).logits[0].double()

    return encode, (lambda ids: all_logits(ids)[-1].numpy()), all_logits


# ------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def bench_dirs(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("benchmarks")
    return {"ceval": write_ceval(d / "ceval"), "cmmlu": write_cmmlu(d / "cmmlu"), "mmlu": write_mmlu(d / "mmlu")}


@pytest.fixture(scope="module")
def arts(tiny_model, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bench-artifacts")
    run_cli("int8", tiny_model, d / "int8", check=True)
    run_cli("gguf", tiny_model, d / "tiny-q8_0.gguf", "--outtype", "q8_0", check=True)
    # A user's own card beside the GGUF: the report must leave it as it is.
    (d / "tiny-q8_0.README.md").write_text("# my notes\n\nhand-written, not xquant's\n")
    return {"int8": d / "int8", "q8_0": d / "tiny-q8_0.gguf"}


@pytest.fixture(scope="module")
def bench_report(tiny_model, arts, bench_dirs, tmp_path_factory) -> tuple[Path, dict, float]:
    import time

    out = tmp_path_factory.mktemp("bench-report") / "r"
    t0 = time.perf_counter()
    run_cli("report", tiny_model, arts["int8"], arts["q8_0"], "--out", out, "--eval", "en", "--max-tokens", "256",
            *(a for k, p in bench_dirs.items() for a in ("--benchmark", f"{k}={p}")),
            "--shots", str(SHOTS), "--limit", str(LIMIT), "--kl-divergence", "--model-card", check=True)
    return out, json.loads((out / "report.json").read_text()), time.perf_counter() - t0


# ------------------------------------------------------------------ tests

def test_accuracies_match_an_independent_computation(bench_report, tiny_model, arts):
    from xquant.gguf.kquant import load_llama

    _, rep, seconds = bench_report
    rows = {r["name"]: r for r in rep["artifacts"]}
    assert [b["name"] for b in rep["benchmarks"]] == ["ceval", "cmmlu", "mmlu"]
    assert all("error" not in r for r in rep["artifacts"]), rep["artifacts"]
    scorers = {tiny_model.name: hf_scorer(tiny_model)[:2], arts["int8"].name: hf_scorer(arts["int8"])[:2]}
    llm = load_llama(arts["q8_0"], n_ctx=512)

    def gguf_last(ids):
        llm.reset()
        llm.eval(ids)
        return np.array(llm.scores[len(ids) - 1], dtype=np.float64)

    scorers[arts["q8_0"].name] = (
        lambda t: llm.tokenize(t.encode(), add_bos=llm._model.add_bos_token(), special=False), gguf_last)
    for name, (encode, last) in scorers.items():
        for bench in ("ceval", "cmmlu", "mmlu"):
            got = rows[name]["benchmarks"][bench]
            preds, shortened = independent_predictions(bench, encode, last)
            assert {s: v["predictions"] for s, v in got["subjects"].items()} == preds, (name, bench)
            assert got["questions"] == 2 * LIMIT and got["shots"] == SHOTS
            answers = {s: "".join(q[5] for q in qs[:LIMIT]) for s, qs in (EN if bench == "mmlu" else ZH).items()}
            correct = sum(p == a for s in preds for p, a in zip(preds[s], answers[s]))
            assert got["correct"] == correct and got["accuracy"] == correct / (2 * LIMIT)
            assert got["shortened"] == shortened
    llm.close()
    # The long C-Eval dev examples cannot all fit 512 tokens: shots were dropped, and counted.
    assert rows[tiny_model.name]["benchmarks"]["ceval"]["shortened"] == LIMIT
    n_q = sum(rows[tiny_model.name]["benchmarks"][b]["questions"] for b in ("ceval", "cmmlu", "mmlu"))
    for r in rep["artifacts"]:
        secs = sum(r["benchmarks"][b]["seconds"] for b in r["benchmarks"])
        report(f"benchmarks: {r['name']:>16} {r['kind']:>5} {1000 * secs / n_q:6.1f} s per 1,000 questions "
               f"({SHOTS}-shot, tiny model) " + " ".join(f"{b} {100 * r['benchmarks'][b]['accuracy']:.0f}%"
                                                         for b in r["benchmarks"]))
    report(f"benchmark report: {seconds:.0f} s for 3 models x {n_q} questions + 256 tokens")


def test_divergence_statistics_match_numpy(bench_report, tiny_model, arts):
    from xquant.calib import load_set

    _, rep, _ = bench_report
    row = next(r for r in rep["artifacts"] if r["name"] == arts["int8"].name)
    enc, _, ref_logits = hf_scorer(tiny_model)
    _, _, q_logits = hf_scorer(arts["int8"])
    ids: list[int] = []
    for doc in load_set("en", "eval").documents:
        ids.extend(enc(doc))
        if len(ids) >= 256:
            break
    ids = ids[:256]  # one window: 256 tokens < the 512-token context
    p = torch.log_softmax(ref_logits(ids)[:-1], -1).numpy()
    q = torch.log_softmax(q_logits(ids)[:-1], -1).numpy()
    tgt = np.array(ids[1:])
    kl = (np.exp(p) * (p - q)).sum(1)
    same = p.argmax(1) == q.argmax(1)
    pt, qt = p[np.arange(len(tgt)), tgt], q[np.arange(len(tgt)), tgt]
    dp = np.exp(qt) - np.exp(pt)
    d = row["divergence"]
    assert d["tokens"] == len(tgt)
    close = lambda a, b: np.isclose(a, b, rtol=2e-3, atol=1e-7)  # noqa: E731 - thread counts differ slightly
    for key, want in {"mean": kl.mean(), "median": np.median(kl), "p90": np.percentile(kl, 90),
                      "p95": np.percentile(kl, 95), "p99": np.percentile(kl, 99), "p99_9": np.percentile(kl, 99.9),
                      "max": kl.max()}.items():
        assert close(d["kl"][key], want), (key, d["kl"][key], want)
    n = len(tgt)
    assert close(d["same_top_p"]["value"], same.mean())
    assert close(d["same_top_p"]["stderr"], np.sqrt(same.mean() * (1 - same.mean()) / (n - 1)))
    assert close(d["rms_dp"]["value"], np.sqrt(np.mean(dp ** 2)))
    assert close(d["ln_ppl_ratio"]["value"], np.mean(pt - qt))
    assert close(np.exp(d["ln_ppl_ratio"]["value"]), row["sets"]["en"]["ppl"] / rep["artifacts"][0]["sets"]["en"]["ppl"])
    assert "divergence" not in rep["artifacts"][0]  # the reference against itself: nothing to show
    report(f"divergence int8: mean KL {d['kl']['mean']:.2e}, p99 {d['kl']['p99']:.2e}, max {d['kl']['max']:.2e}, "
           f"same top p {100 * d['same_top_p']['value']:.1f}%, RMS dp {100 * d['rms_dp']['value']:.3f}%")


def test_publisher_table_schema_and_plot(bench_report, arts):
    import jsonschema
    from PIL import Image

    from xquant.report import SCHEMA_PATH

    out, rep, _ = bench_report
    jsonschema.validate(rep, json.loads(SCHEMA_PATH.read_text()))
    md = (out / "report.md").read_text()
    lines = md.splitlines()
    first_table = next(i for i, l in enumerate(lines) if l.startswith("|"))
    head = [c.strip() for c in lines[first_table].strip("|").split("|")]
    assert head == ["artifact", "format", "size on disk", "memory loaded", "C-Eval", "Δ", "CMMLU", "Δ", "MMLU", "Δ",
                    "PPL", "mean KL"]
    body = [l for l in lines[first_table + 2:] if l.startswith("|")][:3]
    assert [c.strip("| ").split(" | ")[0] for c in body] == [r["name"] for r in rep["artifacts"]]
    int8 = next(r for r in rep["artifacts"] if r["name"] == arts["int8"].name)
    ref = rep["artifacts"][0]
    cells = [c.strip() for c in body[1].strip("|").split("|")]
    assert cells[1] == "int8 (LLM.int8)"
    assert cells[4] == f"{100 * int8['benchmarks']['ceval']['accuracy']:.1f}%"
    assert cells[5] == f"{100 * (int8['benchmarks']['ceval']['accuracy'] - ref['benchmarks']['ceval']['accuracy']):+.1f} pt"
    assert "GGUF q8_0" in body[2]
    assert "ln(PPL(Q)/PPL(base))" in md and "accuracy per subject" in md
    with Image.open(out / "report.png") as im:
        assert im.format == "PNG" and im.size[0] > 1000


def test_model_cards(bench_report, tiny_model, arts, tmp_path):
    import yaml

    out, rep, _ = bench_report
    card = arts["int8"] / "README.md"
    text = card.read_text()
    assert text.startswith("---\n")
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["base_model"] == tiny_model.name and front["base_model_relation"] == "quantized"
    assert front["quantized_by"] == "xquant" and front["library_name"] == "transformers"
    assert "bitsandbytes" in front["tags"]
    assert "AutoModelForCausalLM.from_pretrained" in text and "int8 (LLM.int8)" in text
    # The card is listed in the artifact's manifest, so --force may still replace the directory.
    m = json.loads((arts["int8"] / "xquant-manifest.json").read_text())
    listed = {o["path"]: o["sha256"] for o in m["outputs"]}
    assert listed["README.md"] == hashlib.sha256(card.read_bytes()).hexdigest()
    copy = tmp_path / "int8"
    shutil.copytree(arts["int8"], copy)
    run_cli("int8", tiny_model, copy, "--force", check=True)
    # The user's own README beside the GGUF is untouched, and the report says so.
    assert (arts["q8_0"].parent / "tiny-q8_0.README.md").read_text().startswith("# my notes")
    cards = {c["artifact"]: c for c in rep["model_cards"]}
    assert cards[arts["int8"].name]["written"] and not cards[arts["q8_0"].name]["written"]
    assert "not written by xquant" in (out / "report.md").read_text()


def test_recipe_report_table_takes_the_same_keys(tmp_path):
    from xquant.commands.report import ReportOptions
    from xquant.errors import UnsupportedError

    o = ReportOptions.from_table({"benchmark": ["ceval=/data/ceval", "mmlu=/data/mmlu"], "shots": 5, "limit": 20,
                                  "kl_divergence": True, "model_card": True}, "recipe: [report]")
    assert o.benchmark == ("ceval=/data/ceval", "mmlu=/data/mmlu") and o.kl_divergence and o.limit == 20
    with pytest.raises(UnsupportedError, match="unknown benchmark 'gsm8k'"):
        ReportOptions.from_table({"benchmark": ["gsm8k=/x"]}, "recipe: [report]")
    # a relative directory is the recipe folder's, like every path in a recipe
    o = ReportOptions.from_table({"benchmark": ["cmmlu=data/cmmlu"]}, "recipe: [report]", tmp_path)
    assert o.benchmark == (f"cmmlu={(tmp_path / 'data' / 'cmmlu').resolve()}",)


def test_malformed_benchmark_files_fail_before_evaluation(tiny_model, tmp_path):
    def fresh(name):
        d = tmp_path / name
        return {"ceval": write_ceval(d / "ceval"), "cmmlu": write_cmmlu(d / "cmmlu"), "mmlu": write_mmlu(d / "mmlu")}

    cases = []
    d = fresh("no-column")  # C-Eval val without its answer column
    f = d["ceval"] / "val" / "basic_arithmetic_val.csv"
    f.write_text("id,question,A,B,C,D\n0,q,a,b,c,d\n")
    cases.append((d, ["basic_arithmetic_val.csv", "row 1", "missing column 'answer'"]))
    d = fresh("bad-answer")  # CMMLU answer outside A-D on the third data row
    f = d["cmmlu"] / "test" / "daily_life.csv"
    rows = list(csv.reader(f.open(encoding="utf-8")))
    rows[3][6] = "E"
    with f.open("w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows(rows)
    cases.append((d, ["daily_life.csv", "row 4", "answer 'E'"]))
    d = fresh("no-dev")  # an MMLU subject with test questions but no dev examples
    (d["mmlu"] / "dev" / "simple_units_dev.csv").unlink()
    cases.append((d, ["simple_units_dev.csv", "simple_units"]))
    d = fresh("short-row")  # an MMLU row with too few cells
    (d["mmlu"] / "test" / "elementary_facts_test.csv").write_text("q,a,b,c,d,A\nq2,a,b\n")
    cases.append((d, ["elementary_facts_test.csv", "row 2"]))
    for i, (dirs, needles) in enumerate(cases):
        out = tmp_path / f"out{i}"
        proc = run_cli("report", tiny_model, tiny_model, "--out", out,
                       *(a for k, p in dirs.items() for a in ("--benchmark", f"{k}={p}")))
        assert_one_line_error(proc, *needles)
        assert not out.exists() and not list(tmp_path.glob(f".out{i}*"))
    assert_one_line_error(run_cli("report", tiny_model, tiny_model, "--out", tmp_path / "o", "--benchmark",
                                  f"ceval={tmp_path / 'nowhere'}"), "nowhere", "no such directory")
