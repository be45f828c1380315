"""Fused linear + loss on the GPU: cuBLAS GEMMs per chunk, the fused loss kernels in place.

Two routes, chosen by the memory budget (:func:`mlsoftmax.linear.plan`):

**Rows** (:func:`run`, the fast route). For each chunk of ``R`` rows:

1. ``z = s * h_r @ W.T + b`` with cuBLAS, in the input dtype (``[R, K]``);
2. the fused Triton kernel (:mod:`.triton_loss`) overwrites ``z`` with the
   row-scaled gradient ``G`` (target terms formed in fp32, rounded once) and
   returns the chunk's losses;
3. ``dX_r = s * G @ W`` and ``dW += s * G^T @ h_r``, with ``dW`` accumulated in
   fp32 across chunks, ``db += sum_r G`` and ``ds += <h_r, G @ W>``.

Three GEMMs in all, and the gradients are ready at the end of the forward (the
backward only scales them by ``grad_out``). Extra memory is the ``[R, K]``
chunk plus the fp32 ``dW`` accumulator (``4 K D`` bytes for bf16/fp16 weights).
Sparse targets reach the kernel through a slice of the CSR offsets (the kernel
reads absolute positions), so no host sync is needed to cut the positives.

**Lean rows** (``run(lean=True)``; ``LEAN_ROWS``, on). The rows route in a small budget, with no fp32
accumulator: ``dW`` accumulates in the weight's own dtype (bf16/fp16), one rounding a chunk. To keep that rounding
off the large gradients of the classes with a positive, the positives' target terms ``E`` (fp32,
:func:`target_terms`) are added back over each chunk's gradient after its ``dX`` GEMM (:func:`add_entries_`), so
that ``dW`` accumulates ``P = G + E``, and ``E^T h`` is taken from ``dW`` once at the end in fp32
(:func:`subtract_target_rows_`, the positives sorted by class). Sparse targets only.

**Labels** (:func:`labels_forward`, :func:`labels_backward`, the lean route).
Like :mod:`.torch_linear`, chunks of ``C`` classes with an online log-sum-exp,
but each chunk's elementwise work is one Triton pass over the cuBLAS logits:

1. forward: ``z_c = s * h @ W_c.T + b_c`` (``[B, C]``), then one read of ``z_c``
   for its partial max / sum-exp (:func:`.triton_loss.slab_stats`, merged once
   over all chunks by :func:`.triton_loss.merge_stats`); the
   positives' logits are fp32 dot products (:func:`positive_logits`);
2. backward: recompute ``z_c``, overwrite it with ``G_c`` in one pass
   (:func:`.triton_loss.slab_grad`), write the positives' exact fp32 entries
   (:func:`write_entries_`), then ``dX += G_c @ W_c`` (fp32 accumulator) and
   ``dW_c = G_c^T @ h`` (one GEMM over all rows, rounded once: no accumulator).

Four GEMMs, and extra memory ``B C`` elements plus two ``[B, D]`` fp32 buffers.

**The epilogue GEMM** (``EPILOGUE``, off: measured slower than cuBLAS plus the loss pass on an H200; sparse
targets).
One Triton GEMM (:func:`_gemm_loss_kernel`) computes a tile of logits in fp32
and, before anything is stored, reduces it: per row, the tile's max and sum-exp
(and ``sum w z`` for smoothing), merged over 8 tiles into partial statistics
``[B, C / 1024, 6]``, or the
gradient ``a softmax - bs w`` once the log-sum-exp is known. In the rows route it
stores the logits with their statistics, so that the loss needs one read of them
instead of two (:func:`.triton_loss.finish_from_stats`); in the labels route the
first pass stores no logits at all and the second stores the gradient directly,
which removes two of the four passes over each chunk of logits.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import torch_chunked, triton_interpreting, triton_loss
from .torch_linear import addmm_fp32_
from .triton_loss import LOG2E, _sparse_stats, cdiv

# --------------------------------------------------------------------------- constants
BLOCK_N = 64  # positives per program
BLOCK_D = 128  # features per step of the positives' dot products
INTERPRET_BLOCK_D = 16  # small under the interpreter, so tests cover the loop over D
# The logits GEMM with the loss in its epilogue (:func:`gemm_stats`, :func:`gemm_grad`) instead of cuBLAS and a
# separate pass over the logits. Off: measured slower on an H200 at B=8192, D=1024, K=262144 bf16 (BENCHMARKS.md;
# fast route 26.7 against 22.0 ms, lean 30.3 against 29.8; ``ours-fast-e`` / ``ours-lean-e`` in
# benchmarks/bench_linear.py). Sparse targets only; a dense target keeps the cuBLAS routes.
EPILOGUE = False
# The loss kernels' gradient pass backwards in these routes (``triton_loss.REVERSE_GRAD`` is the loss's own):
# off, measured slower in the rows route on an H200 at the point above (23.0-23.6 against 21.8-22.2 ms, 3 runs).
REVERSE_GRAD = False
# The lean rows route (``run(lean=True)``): when the fast route's fp32 dW accumulator does not fit the budget, the rows
# route with dW accumulated in the weight's own dtype (bf16/fp16), the positives' target terms kept out of it and
# added once at the end in fp32: three GEMMs instead of the labels route's four. Its dW error, emulated on the CPU
# (benchmarks/dw_accumulation.py, the reference: the fp32 path), is the naive bf16 path's overall, and
# 2.2-2.4x the naive path's on the classes without a positive in the batch at 16-17 chunks (3.0-3.2x at 32);
# ``MAX_LEAN_CHUNKS`` caps the chunks. On by default (a later session, without a device): the labels route it
# replaces there took 29.8-30.0 ms on an H200 at issue #5's lean point, over the issue's 25, and its four GEMMs alone
# need 25.7; this route's three took 19 ms there, plus an estimated 17 x 1 GB of bf16 dW read and written. Not yet
# timed (case ``ours-lean``; ``ours-lean-k``, this switch off, times the labels route in benchmarks/bench_linear.py).
LEAN_ROWS = True
MAX_LEAN_CHUNKS = 32
ROW_ALIGN = 64  # elements between the rows of a chunk's logits: C rounded up (an odd C would misalign every row)
TILE_N = 128  # classes per GEMM tile (fixed, with STATS_TILES: it sets the statistics' shape)
STATS_TILES = 8  # tiles of classes per program when reducing to statistics: one slot per 1024 classes
INTERPRET_TILE = 16  # tiles (M, N and the D step) under the interpreter
INTERPRET_STATS_TILES = 2
GEMM_CONFIGS = [  # (BLOCK_M, BLOCK_K, num_warps, num_stages), autotuned on the GPU per shape (few: each compiles)
    (128, 64, 8, 3), (128, 64, 4, 4), (128, 32, 8, 4),
]


# --------------------------------------------------------------------------- kernels
@triton.jit
def _positive_logits_kernel(
    H, stride_h,  # [B, D] hidden
    Wt, stride_w,  # [K, D] classifier weight
    IDX, ROWS,  # [nnz] class and row of each positive
    OUT,  # [nnz] fp32 out: <h_row, w_class>
    NNZ, D,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # 1. this program's positives
    j = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    jm = j < NNZ
    rows = tl.load(ROWS + j, mask=jm, other=0).to(tl.int64)  # [BLOCK_N]
    idx = tl.load(IDX + j, mask=jm, other=0).to(tl.int64)  # [BLOCK_N]
    # 2. their dot products over D, in fp32
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)  # [BLOCK_D]
        m2 = jm[:, None] & (d < D)[None, :]
        h = tl.load(H + rows[:, None] * stride_h + d[None, :], mask=m2, other=0.0).to(tl.float32)  # [BLOCK_N, BLOCK_D]
        w = tl.load(Wt + idx[:, None] * stride_w + d[None, :], mask=m2, other=0.0).to(tl.float32)  # [BLOCK_N, BLOCK_D]
        acc += tl.sum(h * w, 1)
    tl.store(OUT + j, acc, mask=jm)


@triton.jit
def _entries_kernel(
    G, stride_g,  # [R, C] gradient of the rows [r0, r0 + R) and classes [c0, c0 + C)
    IDX, ROWS, VALS,  # [nnz] class, row and fp32 value of each positive
    NNZ, r0, R, c0, C,
    ADD: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # 1. this program's positives that fall in the block of rows and classes
    j = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    jm = j < NNZ
    idx = tl.load(IDX + j, mask=jm, other=0).to(tl.int64) - c0  # [BLOCK_N] column in the block
    rows = tl.load(ROWS + j, mask=jm, other=0).to(tl.int64) - r0  # [BLOCK_N] row in the block
    mine = jm & (idx >= 0) & (idx < C) & (rows >= 0) & (rows < R)
    ptr = G + rows * stride_g + idx  # [BLOCK_N]
    # 2. their entries (ADD: added to the stored ones in fp32), rounded once; a row lists a class once, so no
    # two positives meet at one entry
    v = tl.load(VALS + j, mask=mine, other=0.0)
    if ADD:
        v += tl.load(ptr, mask=mine, other=0.0).to(tl.float32)
    tl.store(ptr, v.to(G.dtype.element_ty), mask=mine)


@triton.jit
def _target_rows_kernel(
    DW, stride_dw,  # [K, D] the weight's gradient, in its own dtype (updated in place)
    H, stride_h,  # [B, D] hidden
    SIDX, ORDER, END,  # [nnz] the positives' classes sorted, their positions in the CSR, each run of a class's end
    ROWS, TGT,  # [nnz] row and fp32 target term of each positive (CSR order)
    SCALE,  # [] fp32 logit scale (HAS_SCALE)
    NNZ, D,
    HAS_SCALE: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # 1. one program per positive (in class order) and block of features: the first of a class's run does the work
    j = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # [BLOCK_D]
    dm = d < D
    k = tl.load(SIDX + j).to(tl.int64)
    prev = tl.load(SIDX + tl.maximum(j - 1, 0)).to(tl.int64)
    if (j == 0) | (prev != k):
        # 2. sum_j t_j h[row_j] over the class's positives, in fp32
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for q in range(j, tl.load(END + j)):
            p = tl.load(ORDER + q)
            r = tl.load(ROWS + p).to(tl.int64)
            acc += tl.load(TGT + p) * tl.load(H + r * stride_h + d, mask=dm, other=0.0).to(tl.float32)
        if HAS_SCALE:
            acc = acc * tl.load(SCALE)
        # 3. taken from the class's accumulated gradient, rounded once
        ptr = DW + k * stride_dw + d  # [BLOCK_D]
        g = tl.load(ptr, mask=dm, other=0.0).to(tl.float32) - acc
        tl.store(ptr, g.to(DW.dtype.element_ty), mask=dm)


@triton.jit
def _logit_tile(H, stride_h, Wt, stride_w, BIAS, SCALE, rm, rn, m_ok, n_ok, D, HAS_BIAS: tl.constexpr,
                HAS_SCALE: tl.constexpr, IEEE: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``s * h[rm] @ w[rn].T + b[rn]``, a ``[BLOCK_M, BLOCK_N]`` tile of logits accumulated in fp32."""
    rk = tl.arange(0, BLOCK_K)
    h_ptr = H + rm.to(tl.int64)[:, None] * stride_h + rk[None, :]  # [BLOCK_M, BLOCK_K]
    w_ptr = Wt + rn.to(tl.int64)[None, :] * stride_w + rk[:, None]  # [BLOCK_K, BLOCK_N]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        if EVEN_K:  # D a multiple of BLOCK_K: no mask along D
            a = tl.load(h_ptr + k0, mask=m_ok[:, None], other=0.0)
            b = tl.load(w_ptr + k0, mask=n_ok[None, :], other=0.0)
        else:
            k_ok = (k0 + rk) < D
            a = tl.load(h_ptr + k0, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(w_ptr + k0, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if IEEE:  # fp32 inputs, or any under the interpreter (whose bf16 products are not to be trusted)
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    if HAS_SCALE:
        acc = acc * tl.load(SCALE)
    if HAS_BIAS:
        acc = acc + tl.load(BIAS + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _gemm_loss_kernel(
    H, stride_h,  # [B, D] hidden
    Wt, stride_w,  # [C, D] the classes' weights
    BIAS,  # [C] (HAS_BIAS)
    SCALE,  # [] fp32 logit scale (HAS_SCALE)
    CW,  # [C] fp32 class weights (HAS_WEIGHT)
    Z, stride_z,  # [B, C] out: the logits (WRITE_Z) or the gradient (GRAD)
    STATS,  # [B, S, 6] fp32 out (STATS_OUT): per N_TILES * BLOCK_N classes max, sum-exp, 0, 0, 0, sum w z
    COEF,  # [B, 4] fp32 in (GRAD): lse, scale of the softmax, of the target, of the smoothing mass
    B, C, D, S,
    WRITE_Z: tl.constexpr, STATS_OUT: tl.constexpr, GRAD: tl.constexpr, ROUND_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTH: tl.constexpr,
    IEEE: tl.constexpr, EVEN_K: tl.constexpr, N_TILES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # 0. programs ordered rows-fastest: a strip of classes is read from memory once, while every row tile uses it;
    # each program takes N_TILES tiles of classes in turn (one slot of statistics for all of them)
    pid = tl.program_id(0)
    num_m = tl.cdiv(B, BLOCK_M)
    pid_m = pid % num_m
    group = pid // num_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] rows
    m_ok = rm < B
    rows = rm.to(tl.int64)
    if GRAD:
        lse = tl.load(COEF + rows * 4 + 0, mask=m_ok, other=0.0)  # [BLOCK_M]
        a = tl.load(COEF + rows * 4 + 1, mask=m_ok, other=0.0)
        bs = tl.load(COEF + rows * 4 + 3, mask=m_ok, other=0.0)
    m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)  # running max, sum-exp and sum w z
    s = tl.zeros((BLOCK_M,), dtype=tl.float32)
    sx = tl.zeros((BLOCK_M,), dtype=tl.float32)
    t0 = group * N_TILES
    for t in range(t0, tl.minimum(t0 + N_TILES, tl.cdiv(C, BLOCK_N))):
        rn = t * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] classes
        n_ok = rn < C
        valid = m_ok[:, None] & n_ok[None, :]
        # 1. the tile of logits in fp32, then (ROUND_Z) the value that a pass over the stored logits would read
        z = _logit_tile(H, stride_h, Wt, stride_w, BIAS, SCALE, rm, rn, m_ok, n_ok, D, HAS_BIAS, HAS_SCALE, IEEE,
                        EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K)  # [BLOCK_M, BLOCK_N]
        if ROUND_Z:
            z = z.to(Z.dtype.element_ty).to(tl.float32)
        if HAS_WEIGHT:
            w = tl.load(CW + rn, mask=n_ok, other=0.0)  # [BLOCK_N] fp32
        z_ptr = Z + rows[:, None] * stride_z + rn[None, :]  # [BLOCK_M, BLOCK_N]
        if STATS_OUT:
            # 2. merged into the running statistics per row: online max and sum-exp, and sum w z for smoothing
            zm = tl.where(valid, z, float("-inf"))
            m_new = tl.maximum(m, tl.max(zm, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            s = s * tl.exp2((m - m_safe) * LOG2E) + tl.sum(tl.exp2((zm - m_safe[:, None]) * LOG2E), 1)
            m = m_new
            if HAS_SMOOTH:
                sx += tl.sum(tl.where(valid, z * w[None, :] if HAS_WEIGHT else z, 0.0), 1)
        if WRITE_Z:
            # 3. the logits themselves, for a later pass
            tl.store(z_ptr, z.to(Z.dtype.element_ty), mask=valid)
        if GRAD:
            # 4. the gradient a softmax - bs w (the positives' exact entries are written over it afterwards)
            g = tl.exp2((z - lse[:, None]) * LOG2E) * a[:, None]
            if HAS_SMOOTH:
                g = g - (bs[:, None] * w[None, :] if HAS_WEIGHT else bs[:, None])
            tl.store(z_ptr, g.to(Z.dtype.element_ty), mask=valid)
    if STATS_OUT:
        # 5. this program's slot of statistics (the target sums are the caller's: zero here)
        out = STATS + (rows * S + group) * 6  # [BLOCK_M]
        zero = tl.zeros((BLOCK_M,), dtype=tl.float32)
        tl.store(out + 0, m, mask=m_ok)
        tl.store(out + 1, s, mask=m_ok)
        tl.store(out + 2, zero, mask=m_ok)
        tl.store(out + 3, zero, mask=m_ok)
        tl.store(out + 4, zero, mask=m_ok)
        tl.store(out + 5, sx, mask=m_ok)


@triton.jit
def _positive_sums_kernel(
    X, stride_x,  # [R, K] a chunk of rows' logits
    IDX, OFFS, VALS,  # CSR target: [nnz] indices, [R + 1] offsets (absolute positions), [nnz] values (HAS_VALUES)
    W,  # [K] fp32 class weights (HAS_WEIGHT)
    STATS,  # [R, S, 6] fp32: the positives' mass, weighted mass and sum w v x go into slice 0
    S,
    HAS_VALUES: tl.constexpr, HAS_WEIGHT: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # 1. a row's positives, gathered from its logits
    row = tl.program_id(0).to(tl.int64)
    mass, wmass, dot = _sparse_stats(X + row * stride_x, IDX, VALS, W, tl.load(OFFS + row), tl.load(OFFS + row + 1),
                                     HAS_VALUES, HAS_WEIGHT, BLOCK_P)
    # 2. into the first slice's target sums (the GEMM wrote zeros there)
    out = STATS + row * S * 6
    tl.store(out + 2, mass)
    tl.store(out + 3, wmass)
    tl.store(out + 4, dot)


# --------------------------------------------------------------------------- launchers
def positive_logits(h: Tensor, w: Tensor, indices: Tensor, row_ids: Tensor) -> Tensor:
    """``<h[row_ids[j]], w[indices[j]]>`` for every positive ``j``, ``[nnz]`` fp32 (inputs contiguous in D)."""
    nnz, d = indices.numel(), h.shape[1]
    h, w = (t if t.stride(1) == 1 else t.contiguous() for t in (h, w))
    out = torch.empty(nnz, dtype=torch.float32, device=h.device)  # [nnz]
    if nnz:
        block_d = INTERPRET_BLOCK_D if triton_interpreting() else BLOCK_D
        _positive_logits_kernel[(cdiv(nnz, BLOCK_N),)](
            h, h.stride(0), w, w.stride(0), indices, row_ids, out, nnz, d, BLOCK_N=BLOCK_N, BLOCK_D=block_d,
        )
    return out


def _entries(g: Tensor, indices: Tensor, row_ids: Tensor, vals: Tensor, r0: int, c0: int, add: bool) -> Tensor:
    nnz = indices.numel()
    if nnz:
        _entries_kernel[(cdiv(nnz, BLOCK_N),)](
            g, g.stride(0), indices, row_ids, vals, nnz, r0, g.shape[0], c0, g.shape[1], ADD=add, BLOCK_N=BLOCK_N,
        )
    return g


def write_entries_(g: Tensor, indices: Tensor, row_ids: Tensor, vals: Tensor, c0: int) -> Tensor:
    """``g[row, k - c0] = vals`` for the positives ``(row, k)`` with ``k`` in ``[c0, c0 + C)``; no host sync."""
    return _entries(g, indices, row_ids, vals, 0, c0, add=False)


def add_entries_(g: Tensor, indices: Tensor, row_ids: Tensor, vals: Tensor, r0: int) -> Tensor:
    """``g[row - r0, k] += vals`` (in fp32, rounded once) for the positives of the rows ``[r0, r0 + R)``."""
    return _entries(g, indices, row_ids, vals, r0, 0, add=True)


def subtract_target_rows_(dw: Tensor, h: Tensor, indices: Tensor, row_ids: Tensor, tgt: Tensor,
                          scale: Optional[Tensor]) -> Tensor:
    """``dw[k] -= s * sum_j tgt_j h[row_j]`` over the positives ``j`` of class ``k``: in fp32, one rounding a class.

    The positives are sorted by class (no host sync), and the first of each class's run sums the run.
    """
    nnz, d = indices.numel(), h.shape[1]
    if not nnz:
        return dw
    h = h if h.stride(1) == 1 else h.contiguous()
    sidx, order = torch.sort(indices)  # [nnz] each
    end = torch.searchsorted(sidx, sidx, right=True)  # [nnz] where each class's run ends
    block_d = INTERPRET_BLOCK_D if triton_interpreting() else BLOCK_D
    _target_rows_kernel[(nnz, cdiv(d, block_d))](
        dw, dw.stride(0), h, h.stride(0), sidx, order, end, row_ids, tgt, tgt if scale is None else scale, nnz, d,
        HAS_SCALE=scale is not None, BLOCK_D=block_d,
    )
    return dw


@functools.cache
def _tuned_gemm():
    """The epilogue GEMM, autotuned over ``GEMM_CONFIGS`` per shape and mode (GPU only: never under the interpreter)."""
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_K": k}, num_warps=w, num_stages=st) for m, k, w, st in GEMM_CONFIGS]
    return triton.autotune(configs, key=["B", "C", "D", "WRITE_Z", "STATS_OUT", "GRAD", "HAS_SMOOTH"])(
        _gemm_loss_kernel)


def _gemm_loss(h, w, bias, scale, cw, smooth, *, z=None, stats=None, coefs=None, round_z=False):
    """Launch :func:`_gemm_loss_kernel` on ``h`` ``[B, D]`` and the classes ``w`` ``[C, D]``."""
    b, d = h.shape
    c = w.shape[0]
    if b == 0 or c == 0:
        return
    h, w = (t if t.stride(1) == 1 else t.contiguous() for t in (h, w))
    interp = triton_interpreting()
    bn = INTERPRET_TILE if interp else TILE_N
    n_tiles = 1 if stats is None else (INTERPRET_STATS_TILES if interp else STATS_TILES)
    groups = cdiv(cdiv(c, bn), n_tiles)  # programs per row tile; one slot of statistics each
    dummy = h
    args = (h, h.stride(0), w, w.stride(0), dummy if bias is None else bias, dummy if scale is None else scale,
            dummy if cw is None else cw, dummy if z is None else z, 0 if z is None else z.stride(0),
            dummy if stats is None else stats, dummy if coefs is None else coefs, b, c, d, groups)
    flags = dict(WRITE_Z=z is not None and coefs is None, STATS_OUT=stats is not None, GRAD=coefs is not None,
                 ROUND_Z=round_z, HAS_BIAS=bias is not None, HAS_SCALE=scale is not None, HAS_WEIGHT=cw is not None,
                 HAS_SMOOTH=smooth, IEEE=h.dtype == torch.float32 or interp, N_TILES=n_tiles, BLOCK_N=bn,
                 EVEN_K=d % (bn if interp else max(k for _, k, _, _ in GEMM_CONFIGS)) == 0)  # for every BLOCK_K
    if interp:
        _gemm_loss_kernel[(cdiv(b, bn) * groups,)](*args, **flags, BLOCK_M=bn, BLOCK_K=bn)
    else:
        _tuned_gemm()[lambda meta: (cdiv(b, meta["BLOCK_M"]) * groups,)](*args, **flags)


def stats_columns(c: int) -> int:
    """Slots of partial statistics per row that :func:`gemm_stats` gives ``c`` classes."""
    interp = triton_interpreting()
    return cdiv(c, (INTERPRET_TILE * INTERPRET_STATS_TILES) if interp else (TILE_N * STATS_TILES))


def gemm_stats(h: Tensor, w: Tensor, bias: Optional[Tensor], scale: Optional[Tensor], cw: Optional[Tensor],
               smooth: bool, write_z: bool = False) -> tuple[Optional[Tensor], Tensor]:
    """The logits ``s * h @ w.T + b`` tile by tile, reduced in the GEMM's epilogue to partial statistics.

    Returns ``(z [B, C] in h's dtype if write_z else None, stats [B, S, 6] fp32)``, the statistics in the format of
    :func:`.triton_loss.slab_stats` (max, sum-exp, three zero target sums, ``sum w z`` with ``smooth``; ``cw``
    fp32 class weights, needed only with ``smooth``). With ``write_z`` the statistics are those of the rounded
    logits that are stored.
    """
    b, c = h.shape[0], w.shape[0]
    stats = torch.empty(b, stats_columns(c), 6, dtype=torch.float32, device=h.device)  # [B, S, 6]
    z = torch.empty(b, c, dtype=h.dtype, device=h.device) if write_z else None  # [B, C]
    _gemm_loss(h, w, bias, scale, cw, smooth, z=z, stats=stats, round_z=write_z)
    return z, stats


def gemm_grad(h: Tensor, w: Tensor, bias: Optional[Tensor], scale: Optional[Tensor], cw: Optional[Tensor],
              smooth: bool, coefs: Tensor) -> Tensor:
    """``a softmax(z) - bs w`` of the logits ``z = s * h @ w.T + b``, formed in the GEMM's epilogue: ``[B, C]``.

    ``coefs`` ``[B, 4]`` are :func:`.triton_loss.pack_coefs`; the positives of a sparse target are left to the
    caller, as in :func:`.triton_loss.slab_grad`.
    """
    out = torch.empty(h.shape[0], w.shape[0], dtype=h.dtype, device=h.device)  # [B, C]
    _gemm_loss(h, w, bias, scale, cw, smooth, z=out, coefs=coefs.contiguous())
    return out


def _reduce_stats(st: Tensor) -> Tensor:
    """Partial statistics ``[B, S, 6]`` merged into one slice ``[B, 1, 6]`` (log-sum-exp of the parts, sums)."""
    m, s = torch_chunked.lse_parts(st[..., 0], st[..., 1])  # [B] each
    return torch.cat([m[:, None], s[:, None], st[..., 2:].sum(1)], 1)[:, None]


def _epilogue(dense: Optional[Tensor], indices: Optional[Tensor]) -> bool:
    """Whether the epilogue GEMM runs: switched on, and a sparse target."""
    return EPILOGUE and dense is None and indices is not None


def _logits(h: Tensor, w: Tensor, bias: Optional[Tensor], scale: Optional[Tensor]) -> Tensor:
    """``s * h @ w.T + b`` (``[R, C]``) in the input dtype, in one GEMM: rounded once, as ``F.linear``'s.

    The scale goes on the small operand (``s * h``, ``[R, D]``, rounded once) and the bias into the GEMM's
    epilogue, so no pass over the logits follows the GEMM (each would read and write all of them). The rows are
    ``ROW_ALIGN`` elements apart (a view of a wider buffer when ``C`` is not a multiple): every row then starts
    on a 16-byte boundary, for the cuBLAS GEMMs that write and read the chunk (an odd leading dimension rules out
    their vectorized kernels) and for the loss kernels' 128-bit accesses.
    """
    if scale is not None:
        h = (h.to(scale.dtype) * scale).to(h.dtype)  # [R, D]
    r, c = h.shape[0], w.shape[0]
    z = torch.empty(r, cdiv(c, ROW_ALIGN) * ROW_ALIGN, dtype=h.dtype, device=h.device)[:, :c]  # [R, C]
    if bias is not None:
        return torch.addmm(bias.to(h.dtype), h, w.T, out=z)
    return torch.mm(h, w.T, out=z)


def run(
    h: Tensor,  # [B, D]
    w: Tensor,  # [K, D]
    bias: Optional[Tensor],  # [K]
    scale: Optional[Tensor],  # [] fp32
    dense: Optional[Tensor],  # [B, K]
    indices: Optional[Tensor],  # [nnz]
    offsets: Optional[Tensor],  # [B + 1]
    values: Optional[Tensor],  # [nnz]
    class_weight: Optional[Tensor],  # [K]
    row_scale: Tensor,  # [B] fp32
    label_smoothing: float,
    rows: int,
    need_grad: bool,
    need_x: bool = True,
    need_w: bool = True,
    row_ids: Optional[Tensor] = None,  # [nnz] (lean)
    lean: bool = False,
):
    """The rows route: ``(row_scale * loss [B] fp32, dX [B, D], dW [K, D] fp32 (lean: w's dtype), db [K] fp32,
    ds [] fp32)``.

    The gradients are ``None`` when ``need_grad`` is false; ``dX`` and ``ds``
    also unless ``need_x``, ``dW`` unless ``need_w``, ``db`` without a bias.

    ``lean`` (a sparse target): ``dW`` accumulates in ``w``'s own dtype, with no fp32 accumulator. The gradient is
    ``G = P - E``, ``E`` the positives' target terms ``w_k (bt v)`` (exact in fp32, :func:`target_terms`) and ``P``
    the rest (the softmax term and any smoothing). ``G @ W`` and ``db`` take ``G`` as the loss kernel wrote it;
    then ``E`` is added back at the positives (:func:`add_entries_`), so that each chunk adds only ``P_r^T h_r`` to
    ``dW``, and ``E^T h`` is taken from ``dW`` once at the end, in fp32 (:func:`subtract_target_rows_`). So a
    positive's class, whose gradient ``E`` dominates, is rounded about as often as the naive path's, and the rest
    (small gradients) once a chunk. What is added back is taken off again, so the gradient is exact for any ``E``
    in exact arithmetic: ``E`` only decides what the 16-bit accumulation sees.
    """
    b, k = h.shape[0], w.shape[0]
    loss = torch.empty(b, dtype=torch.float32, device=h.device)  # [B]
    need_x, need_w = need_grad and need_x, need_grad and need_w
    lean = lean and need_w
    if lean and (indices is None or offsets is None or row_ids is None):
        raise ValueError("the lean rows route takes a sparse target (indices, offsets and row_ids)")
    dx = torch.empty_like(h) if need_x else None  # [B, D]
    dw = (torch.empty if b else torch.zeros)(w.shape, dtype=w.dtype if lean else torch.float32,
                                             device=h.device) if need_w else None  # [K, D]
    tgt = None  # [nnz] the positives' target terms (lean)
    if lean:
        tgt = target_terms(indices, offsets, row_ids, values, class_weight, row_scale, label_smoothing)
    db = torch.zeros(k, dtype=torch.float32, device=h.device) if need_grad and bias is not None else None  # [K]
    ds = torch.zeros((), dtype=torch.float32, device=h.device) if need_x else None
    epi = _epilogue(dense, indices)
    if epi:
        eps = float(label_smoothing)
        cw = None if class_weight is None else class_weight.float()
        scratch = torch.empty(indices.numel() or 1, dtype=torch.float32, device=h.device)  # [nnz] exact entries
    for r0 in range(0, b, rows):
        r1 = min(b, r0 + rows)
        hr = h[r0:r1]  # [R, D]
        if epi:
            # 1-2. the chunk's logits with their statistics from the GEMM's epilogue, the positives' sums, then
            # the losses and one pass that writes the row-scaled gradient over z
            z, st = gemm_stats(hr, w, bias, scale, cw if eps > 0 else None, eps > 0, write_z=True)  # [R, K]
            offs = offsets[r0:r1 + 1]
            _positive_sums_kernel[(r1 - r0,)](
                z, z.stride(0), indices, offs, indices if values is None else values, st if cw is None else cw, st,
                st.shape[1], HAS_VALUES=values is not None, HAS_WEIGHT=cw is not None, BLOCK_P=triton_loss.BLOCK_P,
            )
            block, span = triton_loss.grad_span(r1 - r0, k, h.device)
            triton_loss.finish_from_stats(z, z, loss[r0:r1], st, None, indices, offs, values, cw,
                                          row_scale[r0:r1], scratch, eps, need_grad, span, block, REVERSE_GRAD)
        else:
            # 1. the chunk's logits
            z = _logits(hr, w, bias, scale)  # [R, K]
            # 2. loss and row-scaled gradient, written over z
            loss[r0:r1] = triton_loss.forward(
                z, None if dense is None else dense[r0:r1], indices, None if offsets is None else offsets[r0:r1 + 1],
                values, class_weight, row_scale[r0:r1], label_smoothing, compute_grad=need_grad, inplace=need_grad,
                reverse=REVERSE_GRAD,
            )[0]
        if not need_grad:
            del z
            continue
        # 3. the products; G @ W is shared by dX and ds
        if dx is not None:
            gw = z @ w  # [R, D]
            if scale is not None:
                ds += (hr.float() * gw.float()).sum()
            dx[r0:r1] = gw if scale is None else gw * scale.to(gw.dtype)
        if db is not None:
            db += z.sum(0, dtype=torch.float32)
        if dw is not None and lean:
            add_entries_(z, indices, row_ids, tgt, r0)  # P: the positives' target terms added back
            dw.addmm_(z.T, hr, beta=0.0 if r0 == 0 else 1.0)  # dW += P^T h_r in w's dtype, rounded once a chunk
        elif dw is not None:
            addmm_fp32_(dw, z.T, hr, beta=0.0 if r0 == 0 else 1.0)  # the first chunk overwrites
        del z  # before the next chunk's logits: one chunk alive at a time
    if dw is not None and scale is not None:
        dw.mul_(scale)
    if dw is not None and lean:
        subtract_target_rows_(dw, h, indices, row_ids, tgt, scale)  # dW -= s E^T h, in fp32
    return loss, dx, dw, db, ds


def target_terms(indices: Tensor, offsets: Tensor, row_ids: Tensor, values: Optional[Tensor],
                 class_weight: Optional[Tensor], row_scale: Tensor, label_smoothing: float) -> Tensor:
    """The positives' target terms of the row-scaled gradient, ``[nnz]`` fp32: ``w_k bt v_j`` with
    ``bt = (1 - eps) rs / mass`` per row (``mass`` the row's target sum: its count of positives without values,
    else the difference of an fp64 running sum at its CSR offsets; exact or nearly, and with no atomics, so the
    same on every run), as :func:`.triton_loss._row_terms`."""
    if values is None:
        mass = (offsets[1:] - offsets[:-1]).float()  # [B]
    else:
        csum = torch.nn.functional.pad(values.double().cumsum(0), (1, 0))  # [nnz + 1]
        mass = (csum[offsets[1:]] - csum[offsets[:-1]]).float()  # [B]
    bt = (1.0 - float(label_smoothing)) * row_scale.float() / torch.where(mass > 0, mass, 1.0)  # [B]
    t = bt[row_ids] if values is None else bt[row_ids] * values.float()
    return t if class_weight is None else t * class_weight.float()[indices]


def labels_partial_sums(
    h: Tensor,  # [B, D]
    w: Tensor,  # [K, D]
    bias: Optional[Tensor],  # [K]
    scale: Optional[Tensor],  # [] fp32
    dense: Optional[Tensor],  # [B, K]
    indices: Optional[Tensor],  # [nnz]
    row_ids: Optional[Tensor],  # [nnz]
    values: Optional[Tensor],  # [nnz]
    class_weight: Optional[Tensor],  # [K]
    smooth: bool,
    chunk: int,
):
    """Per-row fp32 ``(lse, dot, mass, wmass, sx)`` over the classes of ``w``, and the positives' logits ``[nnz]``.

    The sums follow :func:`.torch_chunked.combine` (a label-sharded caller
    combines them across shards first).
    """
    b, k = h.shape[0], w.shape[0]
    cw = None if class_weight is None else class_weight.float()
    parts = []  # [B, S_c, 6] per chunk: combined once at the end, so that a chunk costs a GEMM and one launch
    epi = _epilogue(dense, indices)
    step = chunk * 64 if epi else chunk  # no logits stored: a slot of statistics (24 B) per 1024 classes and row
    for c0 in range(0, k, step):
        c1 = min(k, c0 + step)
        bc, cwc = None if bias is None else bias[c0:c1], None if cw is None else cw[c0:c1]
        if epi:
            # 1. the chunk's statistics from the GEMM's epilogue (no logits stored), merged to one slice per row
            parts.append(_reduce_stats(gemm_stats(h, w[c0:c1], bc, scale, cwc if smooth else None, smooth)[1]))
            continue
        # 1. the chunk's logits, then one Triton pass for its statistics (max, sum-exp, dense target sums)
        z = _logits(h, w[c0:c1], bc, scale)  # [B, C]
        parts.append(triton_loss.slab_stats(z, None if dense is None else dense[:, c0:c1], cwc, smooth))
    # 2. every slice of every chunk merged: log-sum-exp of the parts, plain sums of the rest
    if parts:
        lse, mass, wmass, dot, sx = triton_loss.merge_stats(torch.cat(parts, 1))  # [B] each
    else:  # no classes here (an empty shard): log-sum-exp -inf, sums 0
        lse = h.new_full((b,), float("-inf"), dtype=torch.float32)
        mass, wmass, dot, sx = h.new_zeros((4, b), dtype=torch.float32).unbind(0)
    sx = sx if smooth else None
    xg = None
    if indices is not None:
        # 3. the positives' logits as fp32 dot products, then their sums per row
        xg = positive_logits(h, w, indices, row_ids)  # [nnz]
        if scale is not None:
            xg = xg * scale
        if bias is not None:
            xg = xg + bias[indices].float()
        torch_chunked.add_sparse_sums(xg, indices, row_ids, values, cw, mass, wmass, dot)
    return lse, dot, mass, wmass, sx, xg


def labels_forward(h, w, bias, scale, dense, indices, row_ids, values, class_weight, label_smoothing: float,
                   chunk: int):
    """The labels route's forward: per-row fp32 ``(loss, lse, coef, inv_mass)`` and the positives' logits."""
    k, eps = w.shape[0], float(label_smoothing)
    *parts, xg = labels_partial_sums(h, w, bias, scale, dense, indices, row_ids, values, class_weight, eps > 0, chunk)
    wsum = float(k) if class_weight is None else class_weight.float().sum()
    loss, lse, coef, inv_mass, _ = torch_chunked.combine(*parts, k, wsum, eps)
    return loss, lse, coef, inv_mass, xg


def labels_backward(
    grad_rows: Tensor,  # [B] d(total)/d(loss_i), row scale included
    h: Tensor,  # [B, D]
    w: Tensor,  # [K, D]
    bias: Optional[Tensor],
    scale: Optional[Tensor],
    lse: Tensor,  # [B]
    coef: Tensor,  # [B]
    inv_mass: Tensor,  # [B]
    xg: Optional[Tensor],  # [nnz] the positives' logits, from the forward
    dense: Optional[Tensor],
    indices: Optional[Tensor],
    row_ids: Optional[Tensor],
    values: Optional[Tensor],
    class_weight: Optional[Tensor],
    label_smoothing: float,
    chunk: int,
    need_w: bool = True,
    num_classes: Optional[int] = None,
    need_x: bool = True,
    dw_dtype: Optional[torch.dtype] = None,
):
    """The labels route's backward: ``(dX [B, D] fp32, dW [K, D], db [K] fp32, ds [] fp32)``.

    As :func:`.torch_linear.backward`: ``dW`` (in ``dw_dtype``, default ``w``'s)
    only if ``need_w``, ``dX`` and ``ds`` only if ``need_x``, ``db`` only with a
    bias. ``num_classes`` is the total ``K`` when ``w`` holds one shard of the classes.
    """
    k = w.shape[0] if num_classes is None else num_classes
    eps = float(label_smoothing)
    cw = None if class_weight is None else class_weight.float()
    g = grad_rows.float()
    a, bt, bs = torch_chunked.grad_scales(coef, inv_mass, g, eps, k)  # [B] each
    coefs = triton_loss.pack_coefs(lse, a, bt, bs)  # [B, 4]
    ent = None
    if indices is not None:
        # the positives' gradient entries, exact in fp32 (written over each chunk's pass)
        ent = torch_chunked.target_entries(xg, lse, a, bt, bs, indices, row_ids, values, cw)  # [nnz]
    dx = h.new_empty(h.shape, dtype=torch.float32) if need_x else None  # [B, D] G @ W, before the logit scale
    dw = torch.empty_like(w, dtype=dw_dtype or w.dtype) if need_w else None  # [K, D]
    db = h.new_empty(w.shape[0], dtype=torch.float32) if bias is not None else None  # [K]
    epi = _epilogue(dense, indices)
    for c0 in range(0, w.shape[0], chunk):
        c1 = min(w.shape[0], c0 + chunk)
        bc, cwc = None if bias is None else bias[c0:c1], None if cw is None else cw[c0:c1]
        # 1. recompute the chunk's logits and overwrite them with G in one pass (or form G in the GEMM's
        # epilogue), then the exact positives
        if epi:
            z = gemm_grad(h, w[c0:c1], bc, scale, cwc if eps > 0 else None, eps > 0, coefs)  # [B, C]
        else:
            z = _logits(h, w[c0:c1], bc, scale)  # [B, C]
            triton_loss.slab_grad(z, coefs, None if dense is None else dense[:, c0:c1], cwc, eps > 0,
                                  reverse=REVERSE_GRAD)
        if ent is not None:
            write_entries_(z, indices, row_ids, ent, c0)
        # 2. the products: dX accumulated in fp32, dW_c in one GEMM over all rows
        if dx is not None:
            addmm_fp32_(dx, z, w[c0:c1], beta=0.0 if c0 == 0 else 1.0)
        if dw is not None and dw.dtype == z.dtype:
            torch.mm(z.T, h, out=dw[c0:c1])
        elif dw is not None:  # an fp32 master weight's gradient under autocast: the GEMM's fp32 result
            addmm_fp32_(dw[c0:c1], z.T, h, beta=0.0)
        if db is not None:
            db[c0:c1] = z.sum(0, dtype=torch.float32)
    # 3. the logit scale: dX = s G W, dW = s G^T X, ds = <X, G W>
    ds = (h.float() * dx).sum() if scale is not None and dx is not None else None
    if scale is not None:
        if dx is not None:
            dx.mul_(scale)
        if dw is not None:
            dw.mul_(scale)
    return dx, dw, db, ds
