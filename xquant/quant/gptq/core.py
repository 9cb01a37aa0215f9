"""The GPTQ algorithm (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers") as a pure function: weights + Hessian -> integer codes,
per-group scales and zero points, and the column -> group map g_idx.

GPTQ minimises the layer's output error ||WX - QX||² one input column at a time. With
H = 2XXᵀ, quantizing column j leaves an error e_j = (w_j - q_j); the columns not yet quantized
absorb it through the inverse Hessian, W[:, k] -= e_j / [H⁻¹]_jj * [H⁻¹]_jk (the OBS update).
The paper's three practical refinements are all here: a fixed column order (optionally by
decreasing Hessian diagonal, "act-order"), lazy batch updates over blocks of columns, and the
upper Cholesky factor of H⁻¹ in place of repeated inverse updates (numerically stable).

Column order. Plain GPTQ goes left to right. Act-order (`desc_act`) goes by decreasing Hessian
diagonal, so the columns whose inputs carry the most energy are quantized first, while many
columns are still free to absorb their error; its groups are then runs of the permuted order, so
g_idx is a scattered map and kernels must gather. Group-aware reordering (`act_group_aware`, the
default without act-order; Gafni, Karnieli and Hanani, "Dual Precision Quantization for Efficient
and Accurate Deep Neural Networks Inference", CVPRW 2025, as GPTQModel does it) keeps the
contiguous groups of the plain order and only changes when each is visited: groups by decreasing
largest diagonal, and inside a group its columns by decreasing diagonal. Every group is still
quantized as one run with one (scale, zero), so undoing the permutation puts the codes back in
column order with g_idx = i // group_size: a plain checkpoint that every kernel runs at full speed.

Nothing here reads files or knows about models; the layer walker feeds it tensors.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch

from ...errors import XQuantError

BITS = (2, 3, 4, 8)
FP16_TINY = 2.0 ** -24  # the smallest positive float16: every scale must survive the fp16 cast
# Up to this many input features a layer is quantized on one CPU thread (see single_thread): a
# 2048-column inverse Cholesky takes about a second on one core, so extra threads gain little.
SMALL_COLUMNS = 2048


class HessianError(XQuantError):
    """The damped Hessian of a linear layer could not be inverted."""


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize one linear layer."""

    bits: int = 4
    group_size: int = 128  # -1: one group spanning all input features
    sym: bool = True
    desc_act: bool = False
    static_groups: bool = False
    damp: float = 0.01  # fraction of the mean Hessian diagonal added to the diagonal
    block_size: int = 128  # columns per lazy batch update
    act_group_aware: bool = True  # group-aware column order when not desc_act (module docstring)

    @property
    def maxq(self) -> int:
        return 2 ** self.bits - 1

    def group_width(self, columns: int) -> int:
        return columns if self.group_size == -1 else self.group_size


@dataclass
class QuantizedWeight:
    """The result for one linear: everything the checkpoint stores, plus diagnostics.

    `codes[o, i]` is the integer for output row o, input column i (original column order);
    the weight it stands for is `scales[g_idx[i], o] * (codes[o, i] - zeros[g_idx[i], o])`.
    `weight` is exactly that product in float32: the dequantizer of a written checkpoint must
    reproduce it bit for bit (scales are float16-representable by construction).
    """

    codes: torch.Tensor  # [out, in] uint8
    scales: torch.Tensor  # [groups, out] float16
    zeros: torch.Tensor  # [groups, out] int32, in 1..maxq (see find_params)
    g_idx: torch.Tensor  # [in] int32
    weight: torch.Tensor  # [out, in] float32, the dequantized weight
    damp: float  # the damping that made the Hessian invertible
    loss: float  # GPTQ's objective: sum over columns of (w - q)² / [H⁻¹]_jj, halved


def find_params(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (scale, zero) for a slice of columns w [rows, cols], min-max over each row.

    Scales are rounded to float16 here, before any code is chosen, so the codes are optimal for
    the scale the checkpoint will actually hold. Asymmetric zero points are kept in 1..maxq: the
    GPTQ v1 layout stores zero - 1, and a stored -1 is read differently by different kernels
    (borrowing into the next packed field, or overflowing it). A row that would need zero 0 (its
    minimum is about 0) instead gets zero 1 and a scale stretched so its maximum stays covered.
    """
    maxq = spec.maxq
    xmin = w.min(dim=1).values.clamp(max=0)
    xmax = w.max(dim=1).values.clamp(min=0)
    if spec.sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    flat = (xmin == 0) & (xmax == 0)
    xmin = torch.where(flat, -1.0, xmin)
    xmax = torch.where(flat, 1.0, xmax)
    scale = _fp16((xmax - xmin) / maxq)
    if spec.sym:
        zero = torch.full_like(scale, float((maxq + 1) // 2))
    else:
        zero = torch.round(-xmin / scale)
        low = zero < 1
        if bool(low.any()):
            scale = torch.where(low, _fp16(xmax / (maxq - 1)), scale)
        zero = zero.clamp(1, maxq)
    return scale, zero


def _fp16(x: torch.Tensor) -> torch.Tensor:
    out = x.to(torch.float16).to(torch.float32).clamp(min=FP16_TINY)
    if not bool(torch.isfinite(out).all()):
        raise XQuantError("weights too large for float16 GPTQ scales (a group spans more than 65504 × levels)")
    return out


@contextlib.contextmanager
def single_thread(device: torch.device, small: bool = True) -> Iterator[None]:
    """The column loop is thousands of tiny tensor ops, and a small layer's factorisations and
    block updates are short: on CPU, waking other threads for each costs more than it saves
    (10x slower on a busy 2-core machine: a 768-column inverse Cholesky took 0.6 s on two threads,
    0.05 s on one), so run them on one. Wide layers keep every thread: their O(n³) factorisations
    are long enough to gain from them."""
    if device.type != "cpu" or not small:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def inverse_cholesky(H: torch.Tensor, damp: float, name: str) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + λ·mean(diag H)·I)⁻¹, escalating λ until it exists.

    The damping starts at `damp` and doubles while the factorisation fails, up to 1 (the
    Hessian then weighs no more than the identity it is blended with). Raises HessianError
    naming the layer when even that fails, or when H holds NaN/inf.

    H is consumed (the caller's working copy): the factor is returned in H's own storage, as a
    column-major view, so a down_proj-sized H (28672² float32 = 3.3 GB at 70B) is never held
    three times as it was with a new tensor per step. One second buffer is needed: the first
    factorisation reads the damped H into it, and H itself must survive a failed attempt to be
    damped again. The inverse and the second factorisation then run in place in that buffer
    (LAPACK's potri/potrf; the same calls on the same column-major data as out-of-place, so the
    same bits), which is copied back into H.
    """
    if not _all_finite(H):
        raise HessianError(f"{name}: the Hessian has NaN/inf entries (the calibration activations "
                           f"reaching this layer overflowed or are not finite)")
    diag = H.diagonal()
    mean_diag = float(diag.mean())
    if not mean_diag > 0:
        raise HessianError(f"{name}: the Hessian's mean diagonal is {mean_diag:g}, not positive "
                           f"(no calibration signal reaches this layer)")
    original = diag.clone()
    work = torch.empty_like(H).mT  # column-major, as linalg returns its factors
    info = torch.empty((), dtype=torch.int32, device=H.device)
    lam = damp
    while True:
        torch.add(original, lam * mean_diag, out=diag)
        torch.linalg.cholesky_ex(H, out=(work, info))
        if int(info) == 0:
            torch.cholesky_inverse(work, out=work)
            torch.linalg.cholesky_ex(work, upper=True, out=(work, info))
            if int(info) == 0 and _all_finite(work):
                U = H.mT
                U.copy_(work)  # same layout: a plain copy
                return U, lam
        if lam >= 1.0:
            raise HessianError(f"{name}: the Hessian is not positive definite even with damping "
                               f"{lam:g} (started at {damp:g}); the layer's calibration inputs are degenerate")
        lam = min(1.0, lam * 2)


def _all_finite(M: torch.Tensor, rows: int = 1024) -> bool:
    """torch.isfinite(M).all() a block of rows at a time (the mask of a whole H is 0.8 GB at 70B)."""
    return all(bool(torch.isfinite(M[r:r + rows]).all()) for r in range(0, M.shape[0], rows))


def _permute_symmetric_(H: torch.Tensor, perm: torch.Tensor, rows: int = 1024) -> torch.Tensor:
    """H.index_select(0, perm).index_select(1, perm), in place: the columns a block of rows at a
    time, then the rows along the cycles of the permutation (one row held aside per cycle)."""
    for r in range(0, H.shape[0], rows):
        H[r:r + rows] = H[r:r + rows].index_select(1, perm)
    order = perm.tolist()
    done = [False] * len(order)
    for start, first in enumerate(order):
        if done[start] or first == start:
            continue
        held = H[start].clone()
        i = start
        while True:  # row i of the result is row order[i] of the source
            done[i] = True
            j = order[i]
            if j == start:
                H[i] = held
                break
            H[i] = H[j]
            i = j
    return H


def column_order(diag: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """The order GPTQ visits the columns in: perm[k] is the original column quantized k-th.

    desc_act: by decreasing Hessian diagonal (it takes precedence over act_group_aware, as the
    finer of the two orders). act_group_aware: whole groups by decreasing largest diagonal, and
    inside each group its columns by decreasing diagonal, so every run of `group width` positions
    is one original group. Otherwise the identity. Ties keep the original order (stable sorts),
    so the result is deterministic.
    """
    cols = diag.numel()
    if spec.desc_act:
        return torch.argsort(diag, descending=True, stable=True)
    if not spec.act_group_aware:
        return torch.arange(cols, device=diag.device)
    width = spec.group_width(cols)
    by_group = diag.reshape(cols // width, width)
    inside = torch.argsort(by_group, dim=1, descending=True, stable=True)
    groups = torch.argsort(by_group.max(dim=1).values, descending=True, stable=True)
    start = torch.arange(0, cols, width, device=diag.device)[:, None]
    return (inside + start)[groups].reshape(-1)


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, spec: QuantSpec, name: str = "weight",
                  owned: bool = False) -> QuantizedWeight:
    """Quantize W [out, in] given H [in, in] = 2XXᵀ of its calibration inputs.

    Group parameters are chosen when a group's first column comes up, from the columns as
    the error feedback has left them (the lazy block is widened to a multiple of the group
    size so a group never straddles two blocks). With act-order, groups are runs of
    `group_size` columns in the permuted order, and g_idx maps each original column to its
    group; with static groups they are fixed up front on the original weights, in the original
    column order, so g_idx stays monotone (kernels then need no reordering). With the plain or
    the group-aware order, each run of the permuted order is one original group, so the group of
    position c is that of its original column and g_idx is i // group_size.

    `owned`: the caller hands W and H over (it drops them after the call), so they are worked on in
    place rather than copied: at 70B widths a down_proj H is 3.3 GB. W in a 16-bit dtype is converted
    to float32 either way (a copy of its own).
    """
    if spec.bits not in BITS:
        raise XQuantError(f"{name}: {spec.bits}-bit GPTQ is not supported (choose one of {BITS})")
    rows, cols = W.shape
    if H.shape != (cols, cols):
        raise XQuantError(f"{name}: Hessian shape {tuple(H.shape)} does not match {cols} input features")
    width = spec.group_width(cols)
    if cols % width:
        raise XQuantError(f"{name}: group size {width} does not divide {cols} input features")
    maxq = spec.maxq
    W = W.detach().to(torch.float32, copy=not owned)
    H = H.detach().to(torch.float32, copy=not owned)

    # Inputs that never fired carry no information: fix their Hessian row, and the weights
    # they multiply cannot matter to the output, so zero them.
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    n_groups = cols // width
    static = None
    if spec.static_groups or spec.group_size == -1:
        # One (scale, zero) per original group, from the weights before any feedback.
        static = [find_params(W[:, g * width:(g + 1) * width], spec) for g in range(n_groups)]

    perm = column_order(H.diagonal(), spec)
    # Groups are runs of the visiting order (act-order) or the original groups (every other order).
    runs = spec.desc_act and static is None
    if not bool((perm == torch.arange(cols, device=perm.device)).all()):
        W = W[:, perm]
        H = _permute_symmetric_(H, perm)  # in place: no second and third H

    with single_thread(W.device, small=cols <= SMALL_COLUMNS):
        U, used_damp = inverse_cholesky(H, spec.damp, name)
        del H
        codes, scales, zeros, loss = _quantize_columns(W, U, perm, static, runs, spec)

    # Group of each position: a run of the visiting order (act-order) or its column's own group.
    col_group = (torch.arange(cols, device=W.device) if runs else perm) // width
    inv = torch.argsort(perm)
    g_idx = col_group[inv]
    codes = codes[:, inv]
    # The dequantized weight, elementwise the same float32 product the loop fed back.
    weight = scales[g_idx].t() * (codes - zeros[g_idx].t())
    return QuantizedWeight(codes=codes.to(torch.uint8).cpu(), scales=scales.to(torch.float16).cpu(),
                           zeros=zeros.to(torch.int32).cpu(), g_idx=g_idx.to(torch.int32).cpu(), weight=weight.cpu(),
                           damp=used_damp, loss=float(loss))


def _quantize_columns(W: torch.Tensor, U: torch.Tensor, perm: torch.Tensor, static, runs: bool, spec: QuantSpec):
    """The column loop over W (already in visiting order) with U the upper Cholesky factor of H⁻¹.

    Returns (codes [rows, cols] float32 in visiting order, scales and zeros [groups, rows] float32,
    the loss). A block of columns is held transposed, so each column is one contiguous row, and
    updated with one in-place op per step (rank-1 `addr_` on the columns after it); the loss
    and the dequantized values are computed afterwards from the block's errors and codes.
    """
    rows, cols = W.shape
    width, maxq = spec.group_width(cols), spec.maxq
    n_groups = cols // width
    codes = torch.empty((rows, cols), dtype=torch.float32, device=W.device)
    scales = torch.zeros((n_groups, rows), dtype=torch.float32, device=W.device)
    zeros = torch.zeros((n_groups, rows), dtype=torch.float32, device=W.device)
    if static is not None:
        for g, (s, z) in enumerate(static):
            scales[g], zeros[g] = s, z
    loss = torch.zeros((), dtype=torch.float64, device=W.device)
    block = width * max(1, -(-spec.block_size // width)) if width < cols else spec.block_size
    perm_list = perm.tolist()
    scale = zero = None
    for b0 in range(0, cols, block):
        b1 = min(b0 + block, cols)
        n = b1 - b0
        Wt = W[:, b0:b1].t().contiguous()  # [n, rows]: row j is column b0 + j
        Ut = U[b0:b1, b0:b1]
        Qt = torch.empty_like(Wt)
        Et = torch.empty_like(Wt)
        for j in range(n):
            c = b0 + j  # position in the visiting order
            if static is not None:
                g = c // width if runs else perm_list[c] // width
                scale, zero = scales[g], zeros[g]
            elif c % width == 0:  # a group's first column: its columns are the next `width`
                g = c // width if runs else perm_list[c] // width
                scale, zero = find_params(Wt[j:j + width].t(), spec)
                scales[g], zeros[g] = scale, zero
            w, q, e = Wt[j], Qt[j], Et[j]
            torch.div(w, scale, out=q)
            q.round_().add_(zero).clamp_(0, maxq)
            torch.sub(q, zero, out=e)
            e.mul_(scale)  # the dequantized column
            torch.sub(w, e, out=e)
            e.div_(Ut[j, j])  # (w - q) / [H⁻¹]_jj: the OBS error, spread over the later columns
            if j + 1 < n:
                Wt[j + 1:].addr_(Ut[j, j + 1:], e, alpha=-1)
        codes[:, b0:b1] = Qt.t()
        loss += Et.double().square().sum() / 2  # Σ (w - q)² / [H⁻¹]_jj², halved
        if b1 < cols:
            W[:, b1:].addmm_(Et.t(), U[b0:b1, b1:], alpha=-1)
    return codes, scales, zeros, loss


def rtn_quantize(W: torch.Tensor, spec: QuantSpec) -> QuantizedWeight:
    """Round-to-nearest with the same grid (groups, scales, zeros): the baseline GPTQ must beat."""
    W = W.detach().to(torch.float32)
    rows, cols = W.shape
    width = spec.group_width(cols)
    n_groups = cols // width
    codes = torch.empty((rows, cols), dtype=torch.uint8)
    weight = torch.empty_like(W)
    scales = torch.empty((n_groups, rows), dtype=torch.float16)
    zeros = torch.empty((n_groups, rows), dtype=torch.int32)
    for g in range(n_groups):
        sl = slice(g * width, (g + 1) * width)
        s, z = find_params(W[:, sl], spec)
        q = torch.clamp(torch.round(W[:, sl] / s[:, None]) + z[:, None], 0, spec.maxq)
        codes[:, sl], weight[:, sl] = q.to(torch.uint8), s[:, None] * (q - z[:, None])
        scales[g], zeros[g] = s.to(torch.float16), z.to(torch.int32)
    g_idx = (torch.arange(cols) // width).to(torch.int32)
    return QuantizedWeight(codes, scales, zeros, g_idx, weight, damp=0.0, loss=float("nan"))
