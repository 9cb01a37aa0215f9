"""`--engine optimum`: the same quantization through optimum's GPTQQuantizer (GPTQModel backend).

A reference to compare the xquant engine against, not a streaming path: optimum loads the whole
model into memory. It gets the same calibration windows, bits, group size, damping, act-order
and true-sequential groups; GPTQModel's "group aware reordering" is turned off so both engines
run the algorithm of the paper. Two fixes are applied to what optimum 2.3 writes:
- its config.json says `"format": "gptq_v2"` (the in-memory format) while the tensors it saved
  are v1, so transformers would read every zero point off by one; the config's
  quantization_config is replaced by the quantize_config.json optimum wrote beside it;
- the calibration tensors it keeps in its config are dropped before saving (they are not JSON).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import time

import torch

from ...errors import MissingDependencyError, UnsupportedError
from ...io.output import ArtifactDir
from ...pipeline import Executable, Output, execute
from .plan import GPTQPlan
from .result import GPTQResult


def _require() -> None:
    # gptqmodel first: optimum.gptq itself imports gptqmodel, and its failure must name gptqmodel.
    for module, package in (("gptqmodel", "gptqmodel"), ("optimum.gptq", "optimum")):
        try:
            importlib.import_module(module)
        except ImportError:
            raise MissingDependencyError(package, "--engine optimum") from None


def run_optimum(plan: GPTQPlan, force: bool) -> GPTQResult:
    """Quantize with optimum + GPTQModel (the whole model in memory), written by the one executor."""
    if plan.options.static_groups:
        raise UnsupportedError("--static-groups: optimum's GPTQQuantizer has no static groups; use --engine xquant")
    return execute(_OptimumRun(plan), force=force)


class _OptimumRun(Executable):
    """The reference engine as an executor plan: `prepare` quantizes, `write` saves."""

    def __init__(self, plan: GPTQPlan):
        self.plan = plan
        self.provenance = plan.provenance
        self.model = self.quantizer = None
        self.t0 = time.perf_counter()

    def outputs(self) -> list[Output]:
        return [Output(self.plan.out)]

    def prepare(self, force: bool, resume: bool) -> None:
        super().prepare(force, resume)
        plan, o = self.plan, self.plan.options
        # GPTQModel sizes its CPU worker pools from this; its default asks for more workers than a
        # 2-core machine's parent pool has and then refuses to start.
        os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, os.cpu_count() or 2)))
        _require()
        from optimum.gptq import GPTQQuantizer
        from transformers import AutoModelForCausalLM

        from .plan import load_tokenizer

        src_dtype = plan.model.tensors.info(plan.model.arch.layer_tensor(plan.model.arch.linear_roles()[0], 0)).dtype
        load_dtype = torch.float32 if o.device == "cpu" else src_dtype  # CPU half-precision matmuls are slow
        model = AutoModelForCausalLM.from_pretrained(plan.model.path, dtype=load_dtype,
                                                     device_map={"": o.device} if o.device != "cpu" else None)
        windows = plan.calibration.windows
        dataset = [{"input_ids": w[None], "attention_mask": torch.ones_like(w)[None]} for w in windows]
        arch = plan.model.arch
        head = f"{arch.layers_module}.0."
        groups = [[arch.layer_tensor(r, 0)[len(head):].removesuffix(".weight") for r in g] for g in arch.sequential]
        quantizer = GPTQQuantizer(
            bits=o.bits, dataset=dataset, group_size=o.group_size, damp_percent=o.damp, desc_act=o.desc_act,
            act_group_aware=o.group_aware, sym=o.sym, true_sequential=o.true_sequential, model_seqlen=o.seq_len,
            block_name_to_quantize=arch.layers_module, modules_in_block_to_quantize=groups,
        )
        quantizer.quantize_model(model, load_tokenizer(plan.model))
        quantizer.dataset = None
        for p in model.parameters():  # non-quantized tensors back to the source dtype
            if p.dtype.is_floating_point:
                p.data = p.data.to(src_dtype)
        model.config.dtype = src_dtype
        if isinstance(model.config.quantization_config, dict):
            model.config.quantization_config["dataset"] = None
        versions = {p: importlib.metadata.version(p) for p in ("optimum", "gptqmodel", "transformers")}
        plan.provenance.extra["gptq"] = {"engine": "optimum", "versions": versions}
        self.model, self.quantizer = model, quantizer

    def write(self, handles: list[ArtifactDir]) -> None:
        out = handles[0].path
        self.quantizer.save(self.model, str(out), max_shard_size=self.plan.options.max_shard_size)
        qc = json.loads((out / "quantize_config.json").read_text())
        config = json.loads((out / "config.json").read_text())
        config["quantization_config"] = qc
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for f in self.plan.copy_files:
            shutil.copy2(f, out / f.name)

    def finished(self) -> None:
        self.model = self.quantizer = None

    def result(self) -> GPTQResult:
        return GPTQResult(self.plan.out.resolve(), "optimum", round(time.perf_counter() - self.t0, 2))
