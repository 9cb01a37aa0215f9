"""The options of `xquant gptq` (the command object is in gptq.py): the CLI flags, the recipe keys,
and what the GPTQ planner and layer walker read. Imports no torch, so the CLI starts without it."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UnsupportedError
from .options import Options, opt, size_text

ENGINES = ("xquant", "optimum")
DEVICES = ("cpu", "cuda")
MIN_EXPERT_TOKENS = 32  # default: routed experts that see fewer calibration tokens get round-to-nearest


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@dataclass(frozen=True)
class GPTQOptions(Options):
    """The command's options (xquant/commands/options.py: the CLI flags and recipe keys come from
    these fields); recorded in the manifest."""

    command = "gptq"

    bits: int = opt(4, "2, 3, 4 or 8.")
    group_size: int = opt(128, "Input features per scale/zero group; -1: one per row.")
    desc_act: bool = opt(False, "Act-order: quantize columns by decreasing Hessian diagonal (best quality; "
                                "g_idx then scatters, which slows some kernels).")
    act_group_aware: bool = opt(True, "Without --desc-act: visit groups by importance and columns within each by "
                                      "decreasing Hessian diagonal; the checkpoint stays plain (g_idx = i // group).",
                                flag="--act-group-aware/--no-act-group-aware")
    static_groups: bool = opt(False, "Fix group scales before quantizing (act-order without reordering at inference).")
    sym: bool = opt(True, "Symmetric (fixed zero point) or asymmetric groups.", flag="--sym/--asym")
    damp: float = opt(0.01, "Dampening: fraction of the mean Hessian diagonal (raised automatically if needed).")
    true_sequential: bool = opt(True, "Recompute a layer's inputs after each group of linears.",
                                flag="--true-sequential/--no-true-sequential")
    min_expert_tokens: int = opt(MIN_EXPERT_TOKENS, "Mixture of experts: a routed expert sent fewer calibration "
                                                    "tokens than this is rounded to nearest.")
    calibration: tuple[str, ...] = opt(("mixed",), "Bundled set (zh, en, code, mixed) or .txt/.jsonl/dir; repeatable.")
    samples: int = opt(128, "Calibration windows.")
    seq_len: int = opt(2048, "Tokens per window.")
    seed: int = opt(0, "Seed of the window sampling.")
    device: str = opt("cpu", "cpu or cuda (one layer on the device at a time).", fingerprint=False)
    engine: str = opt("xquant", "xquant (layer-streamed) or optimum (reference; loads the whole model).")
    max_shard_size: str = opt("5GB", "Largest output shard (e.g. 5GB, 500MB).", check=size_text)

    def spec(self):
        """The core's QuantSpec (imported here: the options module stays free of torch, so the CLI
        starts without it)."""
        from ..quant.gptq.core import QuantSpec

        return QuantSpec(bits=self.bits, group_size=self.group_size, sym=self.sym, desc_act=self.desc_act,
                         static_groups=self.static_groups, damp=self.damp, act_group_aware=self.group_aware)

    @property
    def group_aware(self) -> bool:
        """Whether the group-aware order is used: act-order, the finer order, takes precedence (GPTQModel
        turns act_group_aware off when desc_act is on, and refuses the two set together explicitly)."""
        return self.act_group_aware and not self.desc_act

    def check(self) -> None:
        from ..quant.gptq.core import BITS

        if self.bits not in BITS:
            raise UnsupportedError(f"--bits {self.bits}: GPTQ stores 2, 3, 4 or 8 bits")
        if self.group_size != -1 and self.group_size <= 0:
            raise UnsupportedError(f"--group-size {self.group_size}: use a positive size or -1 (one group per row)")
        if not 0 < self.damp < 1:
            raise UnsupportedError(f"--damp {self.damp}: must lie between 0 and 1 (a fraction of the mean Hessian diagonal)")
        if self.samples < 1 or self.seq_len < 2:
            raise UnsupportedError(f"--samples {self.samples} --seq-len {self.seq_len}: need at least 1 sample of 2 tokens")
        if self.engine not in ENGINES:
            raise UnsupportedError(f"--engine {self.engine}: unknown (known: {', '.join(ENGINES)})")
        if self.device not in DEVICES:
            raise UnsupportedError(f"--device {self.device}: unknown (known: {', '.join(DEVICES)})")
        if self.device == "cuda" and not _cuda():
            raise UnsupportedError("--device cuda: no CUDA device is available to torch on this machine")
        if not self.calibration:
            raise UnsupportedError("--calibration: name at least one set or file")
        if isinstance(self.min_expert_tokens, bool) or not isinstance(self.min_expert_tokens, int) \
                or self.min_expert_tokens < 1:
            raise UnsupportedError(f"--min-expert-tokens {self.min_expert_tokens}: must be a whole number of "
                                   f"tokens, at least 1")
