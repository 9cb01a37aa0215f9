"""xquant gptq against GPTQModel, side by side: same model, same calibration windows, one dequantizer.

The model is the tests' quantization-sensitive tiny LLaMA (tests/gptq_fixtures.py: the trained
tiny model with activation outlier channels, same function). Both tools get the very same
windows (`--samples` x `--seq-len` tokens of the bundled mixed set, drawn by xquant's sampler;
the bench checks xquant's manifest fingerprint against the windows it hands GPTQModel) and run at
their own defaults, then with act-order, for each row's bits and group size:
- xquant: `xquant gptq SRC OUT --bits B --group-size G [--desc-act]` in a fresh process;
- GPTQModel: `GPTQModel.load(SRC, QuantizeConfig(bits=B, group_size=G[, desc_act=True]))`,
  `.quantize(windows)`, `.save(OUT)` in a fresh process (this file, `--gptqmodel`), on CPU.
Both artifacts are GPTQ v1 and are decoded by one dequantizer (xquant.evaluate.gptq_reference,
which reads the packed bits back independently of either packer), then scored on the held-out
zh + en text (non-overlapping 512-token windows) against the float32 model: perplexity change,
KL divergence (mean over tokens of KL(fp32 || quantized)) and the mean squared logit error.
Wall time and peak RSS are those of each tool's whole process (wait4's ru_maxrss).

    python bench/gptq_vs_gptqmodel.py            # all rows
    XQUANT_BENCH_ROWS=4b-g128 python bench/gptq_vs_gptqmodel.py
Env: XQUANT_BENCH_GPTQ_SAMPLES (64), XQUANT_BENCH_GPTQ_SEQ (256), XQUANT_BENCH_ROWS (comma list of
row names), XQUANT_BENCH_REPEATS (1: runs of each tool per row, alternating which goes first; the
best wall time is shown), XQUANT_BENCH_XQ_ARGS (extra xquant flags, for experiments). GPTQModel
gets GPTQMODEL_CPU_WORKERS=2 (it refuses to start on a 2-core machine without it).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from common import OUT, REPO, Run, gib, measure, xquant_cmd

sys.path.insert(0, str(REPO / "tests"))  # the fixture that builds (and caches) the sensitive model

SAMPLES = int(os.environ.get("XQUANT_BENCH_GPTQ_SAMPLES", "64"))
SEQ = int(os.environ.get("XQUANT_BENCH_GPTQ_SEQ", "256"))
REPEATS = int(os.environ.get("XQUANT_BENCH_REPEATS", "1"))
EVAL_SETS, EVAL_WINDOW = ("zh", "en"), 512
# name -> (bits, group size, act-order)
ROWS = {"4b-g128": (4, 128, False), "4b-g128-act": (4, 128, True),
        "3b-g128": (3, 128, False), "3b-g128-act": (3, 128, True)}
GPTQMODEL_ENV = {"GPTQMODEL_CPU_WORKERS": "2", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@dataclass
class Score:
    ppl: float
    kl: float
    mse: float


def sensitive_model() -> Path:
    from gptq_fixtures import outlier_model_dir

    return outlier_model_dir()


def windows(src: Path):
    """The calibration windows xquant's own run draws (same sampler, same defaults)."""
    from xquant.model import open_hf
    from xquant.quant.gptq.plan import GPTQOptions, calibration_windows

    return calibration_windows(open_hf(src), GPTQOptions(samples=SAMPLES, seq_len=SEQ))


def run_gptqmodel_child(src: str, out: str, windows_file: str, bits: str, group_size: str, act: str) -> None:
    """The GPTQModel side, in its own process: load, quantize at its defaults, save (its progress
    tables go to OUT.log)."""
    log = os.open(f"{out}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    import torch
    from gptqmodel import GPTQModel, QuantizeConfig

    wins = torch.load(windows_file)
    config = QuantizeConfig(bits=int(bits), group_size=int(group_size), **({"desc_act": True} if act == "1" else {}))
    model = GPTQModel.load(src, config, device="cpu", dtype=torch.float32)
    model.quantize([{"input_ids": w[None], "attention_mask": torch.ones_like(w)[None]} for w in wins], batch_size=1)
    model.save(out)


class Scorer:
    """Held-out windows and the float32 model's logits on them, computed once."""

    def __init__(self, src: Path):
        import torch
        from transformers import AutoModelForCausalLM

        from xquant.demo import tiny
        from xquant.evaluate.perplexity import windows as split

        tok = tiny.load_tokenizer(src)
        self.windows = [w for s in EVAL_SETS for w in split(tiny.encode_set(tok, s, "eval"), EVAL_WINDOW)]
        self.tokens = sum(len(w) - 1 for w in self.windows)
        fp32 = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
        self.ref = self._logits(fp32)
        self.fp32_ppl = self._score(self.ref).ppl

    def _logits(self, model):
        import torch

        with torch.inference_mode():
            return [model(torch.tensor([w])).logits[0, :-1].double() for w in self.windows]

    def _score(self, logits) -> Score:
        import torch

        nll = kl = se = 0.0
        for w, lg, ref in zip(self.windows, logits, getattr(self, "ref", logits)):
            lp, rp = torch.log_softmax(lg, -1), torch.log_softmax(ref, -1)
            nll -= float(lp.gather(1, torch.tensor(w[1:])[:, None]).sum())
            kl += float((rp.exp() * (rp - lp)).sum())
            se += float((lg - ref).pow(2).mean(dim=1).sum())
        n = self.tokens
        return Score(math.exp(nll / n), kl / n, se / n)

    def score(self, artifact: Path) -> Score:
        from xquant.evaluate.gptq_reference import load_dequantized

        return self._score(self._logits(load_dequantized(artifact)))


def main() -> None:
    import torch

    if len(sys.argv) > 1 and sys.argv[1] == "--gptqmodel":
        run_gptqmodel_child(*sys.argv[2:])
        return
    src = sensitive_model()
    cal = windows(src)
    root = OUT / "gptq-vs-gptqmodel"
    root.mkdir(parents=True, exist_ok=True)
    wfile = root / "windows.pt"
    torch.save(cal.windows, wfile)
    extra = os.environ.get("XQUANT_BENCH_XQ_ARGS", "").split()
    names = [n for n in os.environ.get("XQUANT_BENCH_ROWS", ",".join(ROWS)).split(",") if n]
    print(f"model {src.name}; calibration {SAMPLES} x {SEQ} tokens of mixed (seed 0); {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.1f}{'; xquant extra ' + ' '.join(extra) if extra else ''}", flush=True)
    # Every run first, scoring after: ru_maxrss of a child counts the parent's size when it forked,
    # so the parent must not yet hold the evaluation models and logits.
    timed: dict[str, tuple[Run, Run]] = {}
    for name in names:
        bits, group, act = ROWS[name]
        xq_out, gm_out = root / f"xquant-{name}", root / f"gptqmodel-{name}"
        args = ["--bits", bits, "--group-size", group, "--samples", SAMPLES, "--seq-len", SEQ, "--force",
                *(["--desc-act"] if act else []), *extra]
        gm_cmd = [sys.executable, __file__, "--gptqmodel", str(src), str(gm_out), str(wfile), str(bits), str(group),
                  "1" if act else "0"]
        runs: dict[str, list[Run]] = {"xquant": [], "GPTQModel": []}
        for r in range(REPEATS):  # alternate who goes first: a shared machine's load drifts
            for tool in (("xquant", "GPTQModel") if r % 2 == 0 else ("GPTQModel", "xquant")):
                if tool == "xquant":
                    runs[tool].append(measure(xquant_cmd("gptq", src, xq_out, *args)))
                else:
                    shutil.rmtree(gm_out, ignore_errors=True)
                    runs[tool].append(measure(gm_cmd, env=GPTQMODEL_ENV))
        manifest = json.loads((xq_out / "xquant-manifest.json").read_text())
        if manifest["calibration"]["windows_sha256"] != cal.fingerprint()["windows_sha256"]:
            raise SystemExit("xquant drew different calibration windows than the ones GPTQModel was given")
        best = {t: Run(min(r.seconds for r in rs), max(r.max_rss for r in rs)) for t, rs in runs.items()}
        timed[name] = (best["xquant"], best["GPTQModel"])
        print(f"{name}: xquant {best['xquant'].seconds:.1f} s, GPTQModel {best['GPTQModel'].seconds:.1f} s", flush=True)

    scorer = Scorer(src)
    print(f"held-out {'+'.join(EVAL_SETS)}: {scorer.tokens} tokens, fp32 ppl {scorer.fp32_ppl:.2f}; "
          f"best of {REPEATS} run(s) per tool")
    head = ("| row | tool | Δppl | KL | logit MSE | wall s | peak RSS | KL ratio xq/gm | time ratio xq/gm "
            "| RSS ratio xq/gm |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, (xq, gm) in timed.items():
        s_xq, s_gm = scorer.score(root / f"xquant-{name}"), scorer.score(root / f"gptqmodel-{name}")
        for tool, s, run in (("xquant", s_xq, xq), ("GPTQModel", s_gm, gm)):
            ratios = (f"{s_xq.kl / s_gm.kl:.2f} | {xq.seconds / gm.seconds:.2f} | {xq.max_rss / gm.max_rss:.2f}"
                      if tool == "xquant" else " | | ")
            lines.append(f"| {name} | {tool} | {s.ppl - scorer.fp32_ppl:+.3f} | {s.kl:.2e} | {s.mse:.2e} | "
                         f"{run.seconds:.1f} | {gib(run.max_rss)} | {ratios} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
