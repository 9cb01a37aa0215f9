"""Perplexity, KL divergence and top-1 agreement over the same windows for every artifact.

The reference's log-probabilities at every scored position are saved (float32 .npy, memory-mapped)
so each artifact's KL divergence to it is computed as llama.cpp's perplexity tool reports it: mean
over tokens of sum_v p_ref(v) (log p_ref(v) - log p(v)), and the share of positions where both
pick the same most likely token.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .perplexity import windows


def score_set(logits_fn: Callable[[list[int]], torch.Tensor], ids: list[int], window: int,
              save_ref: Path | None = None, ref: Path | None = None) -> dict:
    """ppl (+ KL/top-1 against `ref`, or saving log-probs to `save_ref`) for one token stream."""
    wins = windows(ids, window)
    n_scored = sum(len(w) - 1 for w in wins)
    store = ref_lp = None
    if save_ref is not None:
        store = None  # allocated lazily once the vocab size is known
    if ref is not None:
        ref_lp = np.load(ref, mmap_mode="r")
        if ref_lp.shape[0] != n_scored:
            raise ValueError("reference log-probs do not match these windows")
    nll = kl = 0.0
    agree = 0
    pos = 0
    t0 = time.perf_counter()
    for w in wins:
        logits = logits_fn(w)[: len(w) - 1]
        lp = torch.log_softmax(logits.double(), dim=-1)
        target = torch.tensor(w[1:], dtype=torch.long)
        nll += float(-lp.gather(1, target[:, None]).sum())
        if save_ref is not None:
            if store is None:
                store = np.lib.format.open_memmap(save_ref, mode="w+", dtype=np.float32,
                                                  shape=(n_scored, lp.shape[1]))
            store[pos: pos + len(lp)] = lp.float().numpy()
        if ref_lp is not None:
            r = torch.from_numpy(np.asarray(ref_lp[pos: pos + len(lp)])).double()
            if r.shape[1] != lp.shape[1]:
                vocab = min(r.shape[1], lp.shape[1])  # padded vocabularies: compare the shared part
                r, lp = r[:, :vocab], torch.log_softmax(lp[:, :vocab], dim=-1)
            kl += float((r.exp() * (r - lp)).sum())
            agree += int((r.argmax(1) == lp.argmax(1)).sum())
        pos += len(lp)
    seconds = time.perf_counter() - t0
    if store is not None:
        store.flush()
        del store
    out = {"tokens": n_scored + len(wins), "scored": n_scored, "ppl": math.exp(nll / n_scored),
           "seconds": seconds, "tokens_per_s": (n_scored + len(wins)) / seconds if seconds else None}
    if ref_lp is not None:
        out["kl"] = kl / n_scored
        out["top1"] = agree / n_scored
    return out
