"""Perplexity, KL divergence and top-1 agreement over the same windows for every artifact.

The reference's log-probabilities at every scored position are saved (float32 .npy, memory-mapped)
so each artifact's KL divergence to it is computed as llama.cpp's perplexity tool reports it: mean
over tokens of sum_v p_ref(v) (log p_ref(v) - log p(v)), and the share of positions where both
pick the same most likely token. With `per_token=True` the per-position values are kept too, and
`divergence` turns them into llama.cpp's full summary (KL percentiles, same top p, RMS Δp,
ln(PPL(Q)/PPL(base))).
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
              save_ref: Path | None = None, ref: Path | None = None, per_token: bool = False) -> dict:
    """ppl (+ KL/top-1 against `ref`, or saving log-probs to `save_ref`) for one token stream.

    With `per_token` and `ref`, the result also holds "per_token": numpy arrays over the scored
    positions of KL, same top token (0/1), Δp (p(correct token) minus the reference's) and the
    log-probability of the correct token in the reference and here."""
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
    parts: dict[str, list[np.ndarray]] = {"kl": [], "same_top": [], "lp": [], "ref_lp": []}
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
            kl_tok = (r.exp() * (r - lp)).sum(1)
            same = r.argmax(1) == lp.argmax(1)
            kl += float(kl_tok.sum())
            agree += int(same.sum())
            if per_token:
                parts["kl"].append(kl_tok.numpy())
                parts["same_top"].append(same.numpy().astype(np.float64))
                parts["lp"].append(lp.gather(1, target[:, None])[:, 0].numpy())
                parts["ref_lp"].append(r.gather(1, target[:, None])[:, 0].numpy())
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
        if per_token:
            out["per_token"] = {k: np.concatenate(v) for k, v in parts.items()}
    return out


def divergence(kl: np.ndarray, same_top: np.ndarray, lp: np.ndarray, ref_lp: np.ndarray) -> dict:
    """The summary llama.cpp's perplexity tool prints with --kl-divergence, from per-token values:
    KL mean (± standard error), median, 90/95/99/99.9th percentile and max; the share of positions
    with the same top token (± binomial standard error); RMS of Δp, the change in the probability
    of the correct token; ln(PPL(Q)/PPL(base)), the mean change of the correct token's negative
    log-probability (± standard error)."""
    n = len(kl)
    kl = np.maximum(kl, 0.0)  # rounding can leave -1e-12 where both distributions agree
    dp = np.exp(lp) - np.exp(ref_lp)
    dnll = ref_lp - lp  # nll(Q) - nll(base) per token
    p_same = float(same_top.mean())
    rms = float(np.sqrt(np.mean(dp ** 2)))
    se = (lambda x: float(np.std(x, ddof=1) / np.sqrt(n)) if n > 1 else 0.0)
    pct = {f"p{str(q).replace('.', '_')}": float(np.percentile(kl, q)) for q in (90, 95, 99, 99.9)}
    return {
        "tokens": n,
        "kl": {"mean": float(kl.mean()), "stderr": se(kl), "median": float(np.median(kl)), **pct,
               "max": float(kl.max())},
        "same_top_p": {"value": p_same, "stderr": float(np.sqrt(p_same * (1 - p_same) / (n - 1))) if n > 1 else 0.0},
        "rms_dp": {"value": rms, "stderr": se(dp ** 2) / (2 * rms) if rms > 0 else 0.0},
        "ln_ppl_ratio": {"value": float(dnll.mean()), "stderr": se(dnll)},
    }
