"""`xquant apply-delta` and `xquant make-delta`: published delta weights (FastChat and Ziya styles)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import STAND_IN, Command, Input, command
from .options import Options, opt, size_text


def _styles():
    from ..delta import STYLES

    return sorted(STYLES)


_STYLE_HELP = ("fastchat (default: every tensor is a difference; extra vocabulary rows as they are) or ziya "
               "(embedding and lm_head stored whole, as Fengshenbang-LM's tools).")
_SKIP_HELP = "Skip the config-identity and content checks of the base (shapes are still checked)."


@dataclass(frozen=True)
class ApplyDeltaOptions(Options):
    command = "apply-delta"

    dtype: str | None = opt(None, "float16, bfloat16 or float32 (default: the dtype the delta's config declares).",
                            choices=("float16", "bfloat16", "float32"))
    style: str | None = opt(None, _STYLE_HELP, choices=_styles)
    expect_sha256: Path | None = opt(None, "File of expected hashes ('HASH  filename' lines or JSON); "
                                           "a mismatch writes nothing.")
    skip_base_check: bool = opt(False, _SKIP_HELP)
    max_shard_size: str = opt("5GB", "Largest output shard (e.g. 5GB, 500MB).", check=size_text)


@dataclass(frozen=True)
class MakeDeltaOptions(Options):
    command = "make-delta"

    dtype: str | None = opt(None, "Dtype of the stored differences (default float32: exact for 16-bit models; "
                                  "the public tools store float16).", choices=("float16", "bfloat16", "float32"))
    style: str | None = opt(None, _STYLE_HELP, choices=_styles)
    skip_base_check: bool = opt(False, _SKIP_HELP)
    max_shard_size: str = opt("5GB", "Largest output shard (e.g. 5GB, 500MB).", check=size_text)


def _apply(inputs, o: ApplyDeltaOptions, mode: str):
    from ..delta import plan_apply_delta

    # On a stand-in base (a recipe's dry run) the values are placeholders: only shapes and config
    # are checked, whatever the user asked.
    return plan_apply_delta(inputs["base"], inputs["delta"], inputs["out"], o.dtype, o.style, o.expect_sha256,
                            o.max_shard_size, o.skip_base_check or mode == STAND_IN)


def _make(inputs, o: MakeDeltaOptions, mode: str):
    from ..delta import plan_make_delta

    return plan_make_delta(inputs["base"], inputs["target"], inputs["out"], o.style, o.dtype, o.max_shard_size,
                           o.skip_base_check or mode == STAND_IN)


APPLY_DELTA = command(Command(
    name="apply-delta",
    help="Rebuild a model from its base and a published delta (Vicuna, Ziya), one tensor at a time.",
    options=ApplyDeltaOptions,
    inputs=(Input("base", "The base model (HF directory), e.g. LLaMA-13B.", flag="--base"),
            Input("delta", "The published delta (HF directory).", flag="--delta"),
            Input("out", "Output HF directory (config and tokenizer from the delta).", flag="--out")),
    plan=_apply,
    artifact_name=lambda o: "merged",
    source="base",
))

MAKE_DELTA = command(Command(
    name="make-delta",
    help="Publish a fine-tuned model as target - base (FastChat or Ziya style), one tensor at a time.",
    options=MakeDeltaOptions,
    inputs=(Input("base", "The base model (HF directory).", flag="--base"),
            Input("target", "The fine-tuned model to publish as a delta.", flag="--target"),
            Input("out", "Output delta directory.", flag="--out")),
    plan=_make,
))
