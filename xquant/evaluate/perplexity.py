"""Perplexity the standard way: non-overlapping windows, every token after a window's first scored once."""

from __future__ import annotations

import math
from typing import Callable

import torch


def windows(ids: list[int], length: int) -> list[list[int]]:
    """Non-overlapping windows of `length` tokens; a final shorter window is kept if it has ≥ 2."""
    out = [ids[i: i + length] for i in range(0, len(ids), length)]
    return [w for w in out if len(w) >= 2]


def nll_sum(logits: torch.Tensor, ids: list[int]) -> tuple[float, int]:
    """Sum of negative log-likelihoods of ids[1:] under logits[:-1] (float64), and the count."""
    logp = torch.log_softmax(logits[:-1].double(), dim=-1)
    target = torch.tensor(ids[1:], dtype=torch.long)
    return float(-logp.gather(1, target[:, None]).sum()), len(ids) - 1


def perplexity(logits_fn: Callable[[list[int]], torch.Tensor], ids: list[int], window: int) -> float:
    """exp(mean NLL) over windows; logits_fn maps a window's ids to [len, vocab] logits."""
    total, count = 0.0, 0
    for w in windows(ids, window):
        s, n = nll_sum(logits_fn(w), w)
        total += s
        count += n
    return math.exp(total / count)


def hf_logits_fn(model) -> Callable[[list[int]], torch.Tensor]:
    """Logits of a transformers causal LM for one sequence, on CPU."""

    @torch.inference_mode()
    def fn(ids: list[int]) -> torch.Tensor:
        out = model(torch.tensor([ids], device=model.device))
        return out.logits[0].float().cpu()

    return fn
