"""Fused Triton kernel: log-sum-exp, loss and gradient of each row in one launch.

One program handles one row (or, capped at ``ROW_PROGRAMS``, loops over rows).
Pass 1 streams the row once (online max and sum-exp, plus the dense target's
sums), reading with ``evict_last`` so that the row (and a dense target's row)
stays in L2; the positives are gathered from their CSR indices. Pass 2 re-reads
the row (``evict_first``, from its end by default, ``REVERSE_GRAD``, so that the
blocks read last, the likeliest still in L2, come first) and writes the gradient
``row_scale * (c * softmax - T)`` in the output dtype, each entry formed in fp32
and rounded once. The target entries of sparse targets are computed in fp32 into
a small ``[nnz]`` scratch before pass 2 (so that ``inplace=True``, where the
gradient overwrites the logits, still reads the original logits) and written
after a barrier.

Rows are streamed in whole 128-bit vectors: where the row start, its stride or ``K`` is not a multiple of 16
bytes (elements), each row is peeled to its first 16-byte boundary (``PEEL``) and its few edge columns go in one
masked step, so that any ``K`` (say 131071) reads and writes as wide as an aligned one; otherwise Triton's own
specialization of the arguments proves the alignment and the kernels stream as they are.

The backward only scales the gradient by ``grad_out``; a row whose ``grad_out``
is exactly 1 is skipped inside the kernel (no host sync, no memory traffic).

``LAGGED`` (a knob, off: not yet timed on a GPU) runs the lagged kernel instead: rows cut into slices, and a
grid of resident programs that each stream one slice's statistics a step and, ``LAG`` steps later, that slice's
gradient, once the rest of its row is in. Each slice's statistics are three 64-bit words written whole, so
reading them needs no fence or counter, and a slice is re-read soon after its first read, from L2, whatever
the length of its row.

When the batch cannot fill the GPU, the split-row kernels share each row among
several programs (per-slice statistics, a one-launch ``O(B S)`` combine, then
per-slice gradients). The same two kernels, on one chunk or shard of classes,
serve the fused linear route and the label-sharded loss (:func:`partial_sums`,
:func:`backward`).

Tested on the CPU under ``TRITON_INTERPRET=1`` (small blocks, no autotune).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import torch_chunked, triton_interpreting

# --------------------------------------------------------------------------- constants
LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): exp(x) = exp2(x * LOG2E); constexpr, so jit code can read it
ALIGN_BYTES = tl.constexpr(16)  # a 128-bit access: each row is streamed in whole vectors from such a boundary
EDGE_BLOCK = tl.constexpr(16)  # columns a step for a row's head and rest (at most 7 each, around its whole vectors)
MAX_BLOCK = 16384  # elements of a row per step on the GPU (see BENCHMARKS.md: 32768 spills)
INTERPRET_BLOCK = 128  # small blocks under the interpreter, so tests cover the multi-block loop
BLOCK_P = 32  # positives per step
# Programs of the one-row kernel: None = one per row; a number caps the rows in flight (each program then loops
# over rows). Measured on an H100 (BENCHMARKS.md): 132 to 528 programs gained nothing at K=131072 and lost 12% at
# K=262144 (bf16), so the default stays one program per row.
ROW_PROGRAMS = None
# The gradient pass walks each row (and the split-row programs) backwards, so that what the first pass read last,
# the likeliest to be still in L2, is re-read first (a forward re-read of a row larger than its share of L2 finds
# each block already evicted, as a cyclic scan does under LRU). Measured on an H200 (BENCHMARKS.md) at B=4096,
# K=131072: DRAM reads 1.70 GB against 1.92 (Nsight Compute), 0.746-0.824 ms against 0.782-1.051 ms in bf16 and
# 1.503 against 1.575 ms in fp32, three runs each (``ours-r`` / ``ours-f`` in benchmarks/bench_loss.py). The fused
# linear routes keep their own switch (``triton_linear.REVERSE_GRAD``), off: measured slower there.
REVERSE_GRAD = True
# Two more knobs of the one-program-per-row kernel, aimed at the 0.63 GB of its second read that an H200 fetched
# from DRAM instead of L2 (BENCHMARKS.md), and off until measured on a GPU (cases ``ours-w32``, ``ours-s``):
# ROW_WARPS, its warps (None: 16 for a 16384-column block; at 32 this repository's Triton 3.9 gives 44 registers,
# one program a SM, so half as many rows are in flight, 33 MB of bf16 rows against an L2 of 50 MB; the device's
# Triton 3.6 gives 32 registers and two programs a SM, as many rows as at 16 warps: benchmarks/kernel_registers.py;
# ROW_PROGRAMS = the SM count caps the rows in flight on either), and STORE_EVICT_FIRST, the gradient's stores
# marked evict_first, so that its dirty lines leave L2 before the logits that wait for their second read.
ROW_WARPS = None
STORE_EVICT_FIRST = False
# Blocks of a row in flight per program in both passes of the one-row kernel: 1 = a plain loop (each step's
# loads, then its math); N > 1 = Triton's software pipeline (``tl.range(num_stages=N)``): cp.async copies of the
# next N - 1 blocks into shared memory while a block is reduced, N - 1 blocks of shared memory a program (64 KB
# for bf16 at N = 3). A knob, off until a GPU has timed it (cases ``ours-n3``, ``ours-n3-s``): with more bytes
# in flight per program, fewer programs (``ROW_PROGRAMS``) might keep DRAM busy with fewer rows waiting for their
# second read in L2. The device's Triton 3.6 drops the L2 eviction hints of pipelined loads (3.9 keeps them).
ROW_STAGES = 1
# The lagged kernel (a knob, off until a GPU has timed it; cases ``ours-l``, ``ours-l-s``): rows cut into slices of
# LAGGED_SPAN_BYTES, and LAGGED_PER_SM programs a SM, all resident, that each take every P-th slice in turn. At
# each step a program reads one slice's statistics and writes the gradient of the slice it read LAG steps before,
# whose row the other programs have finished by then (a record of three 64-bit words a slice, each word written
# whole, so no fence or counter). The second read then comes about LAG * P slices after the first: 34 MB of
# logits and gradient at the point on an H100 or H200, against the 135 MB that the one-row kernel's rows
# in flight put between them, and as little for rows of any length, where the one-row kernel's re-read misses
# more the longer its rows are (BENCHMARKS.md).
LAGGED = False
LAG = 2  # steps between a slice's statistics and its gradient (more where a row has more slices than programs)
LAGGED_SPAN_BYTES = 32768  # a slice (rounded to whole blocks)
LAGGED_BLOCK = 8192  # columns a step, at 8 warps: 61-64 registers, four programs a SM (kernel_registers.py)
# Programs a SM. They wait for each other, so all must be resident at once: keep this within what an SM holds of
# the compiled kernel (benchmarks/kernel_registers.py: 4 at the default block, 2 with ROW_STAGES = 3)
LAGGED_PER_SM = 2


# --------------------------------------------------------------------------- kernels
@triton.jit
def _load_positives(x_row, IDX, VALS, j0, p1, HAS_VALUES: tl.constexpr, BLOCK_P: tl.constexpr):
    """One block of a row's positives: slots, mask, class ids, their logits (fp32) and weights."""
    pj = j0 + tl.arange(0, BLOCK_P)  # [BLOCK_P] slots in the CSR arrays
    pm = pj < p1
    idx = tl.load(IDX + pj, mask=pm, other=0)  # [BLOCK_P] class ids
    xg = tl.load(x_row + idx, mask=pm, other=0.0).to(tl.float32)  # [BLOCK_P] their logits
    if HAS_VALUES:
        v = tl.load(VALS + pj, mask=pm, other=0.0).to(tl.float32)
    else:
        v = tl.where(pm, 1.0, 0.0)
    return pj, pm, idx, xg, v


@triton.jit
def _aligned_body(x_row, lo, hi, PEEL: tl.constexpr):
    """Columns ``[lo, hi)`` of a row as a head, a body of whole 16-byte vectors and a rest: ``(b0, v1, xb)``, the
    body's ends and ``x_row + b0`` (hinted aligned); the head and the rest have at most 7 columns each.

    With ``PEEL`` the body starts at the first column whose address is a multiple of ``ALIGN_BYTES`` and ends on a
    whole vector, so that its accesses are 128-bit whatever ``K`` and the row stride are: a masked access is
    vectorized only where the compiler can prove both the address aligned and the mask constant over a vector,
    which it cannot for rows that start anywhere, or end at a ``K`` that is not a multiple of 16. Without, the
    launcher found the rows and ``K`` whole vectors already (Triton's specialization proves it): the body is
    ``[lo, hi)``.
    """
    if PEEL:
        esize: tl.constexpr = x_row.dtype.element_ty.primitive_bitwidth // 8
        vec: tl.constexpr = ALIGN_BYTES // esize  # columns a vector
        addr = (x_row + lo).to(tl.int64, bitcast=True)  # a multiple of esize, as PyTorch aligns every tensor
        head = ((addr + (ALIGN_BYTES - 1)) // ALIGN_BYTES * ALIGN_BYTES - addr) // esize  # to the boundary, < vec
        b0 = lo + tl.minimum(head.to(tl.int32), hi - lo)  # int32 like the columns: int64 doubles their registers
        v1 = b0 + (hi - b0) // vec * vec
        xb = tl.multiple_of(x_row + b0, ALIGN_BYTES)
    else:
        b0 = lo
        v1 = hi
        xb = x_row + lo
    return b0, v1, xb


@triton.jit
def _edges(lo, b0, v1, hi):
    """The head ``[lo, b0)`` and the rest ``[v1, hi)`` of a row's columns in one masked step of ``EDGE_BLOCK``:
    ``(offs, mask)``, each ``[EDGE_BLOCK]`` (lanes of the first half for the head, of the second for the rest)."""
    lane = tl.arange(0, EDGE_BLOCK)  # [EDGE_BLOCK]
    half = EDGE_BLOCK // 2
    offs = tl.where(lane < half, lo + lane, v1 + lane - half)
    return offs, offs < tl.where(lane < half, b0, hi)


@triton.jit
def _stats_block(x_base, t_base, w_base, offs, mask, m, s, mass, wmass, dot, sx, wsum, HAS_DENSE: tl.constexpr,
                 HAS_WEIGHT: tl.constexpr, HAS_SMOOTH: tl.constexpr):
    """The running sums of :func:`_stream_stats` after the columns ``offs`` (where ``mask``) of the bases.

    The offsets are added to the base pointers as one tensor: a scalar ``base + k0`` would be folded into a new
    pointer without the base's alignment hint.
    """
    x = tl.load(x_base + offs, mask=mask, other=float("-inf"), eviction_policy="evict_last").to(tl.float32)
    m_new = tl.maximum(m, tl.max(x, 0))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    s = s * tl.exp2((m - m_safe) * LOG2E) + tl.sum(tl.exp2((x - m_safe) * LOG2E), 0)
    m = m_new
    if HAS_WEIGHT:
        w = tl.load(w_base + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_DENSE:
        t = tl.load(t_base + offs, mask=mask, other=0, eviction_policy="evict_last").to(tl.float32)
        tw = t * w if HAS_WEIGHT else t
        mass += tl.sum(t, 0)
        wmass += tl.sum(tw, 0)
        dot += tl.sum(tl.where(t != 0, x, 0.0) * tw, 0)
    if HAS_SMOOTH:
        xs = tl.where(mask, x, 0.0)
        if HAS_WEIGHT:
            sx += tl.sum(xs * w, 0)
            wsum += tl.sum(w, 0)
        else:
            sx += tl.sum(xs, 0)
    return m, s, mass, wmass, dot, sx, wsum


@triton.jit
def _stream_stats(x_row, t_row, W, lo, hi, HAS_DENSE: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                  HAS_SMOOTH: tl.constexpr, PEEL: tl.constexpr, BLOCK: tl.constexpr, STAGES: tl.constexpr = 1):
    """One streaming pass over columns ``[lo, hi)`` of a row (kept in L2 for a second pass).

    Returns the online max and sum-exp (relative to that max), the dense target's
    mass, weighted mass and ``sum w t x``, and for smoothing ``sum w x`` and ``sum w``.
    ``PEEL``: the row is streamed from its first 16-byte boundary (:func:`_aligned_body`), its edges apart; else
    the launcher found the rows and ``K`` whole vectors already, which Triton's specialization then proves.
    """
    m = float("-inf")
    s = 0.0
    mass = 0.0
    wmass = 0.0
    dot = 0.0
    sx = 0.0
    wsum = 0.0
    b0, v1, xb = _aligned_body(x_row, lo, hi, PEEL)
    # 1. the body, whole vectors from an aligned base (128-bit loads; STAGES > 1: cp.async, blocks in flight)
    for k0 in tl.range(0, v1 - b0, BLOCK, num_stages=STAGES):
        offs = k0 + tl.arange(0, BLOCK)  # [BLOCK]
        m, s, mass, wmass, dot, sx, wsum = _stats_block(xb, t_row + b0, W + b0, offs, offs < v1 - b0, m, s, mass,
                                                        wmass, dot, sx, wsum, HAS_DENSE, HAS_WEIGHT, HAS_SMOOTH)
    # 2. the head and the rest around it (at most 7 columns each)
    if PEEL:
        if (b0 > lo) | (v1 < hi):
            offs, mask = _edges(lo, b0, v1, hi)  # [EDGE_BLOCK]
            m, s, mass, wmass, dot, sx, wsum = _stats_block(x_row, t_row, W, offs, mask, m, s, mass, wmass, dot,
                                                            sx, wsum, HAS_DENSE, HAS_WEIGHT, HAS_SMOOTH)
    return m, s, mass, wmass, dot, sx, wsum


@triton.jit
def _sparse_stats(x_row, IDX, VALS, W, p0, p1, HAS_VALUES: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                  BLOCK_P: tl.constexpr):
    """A row's positives, gathered from their CSR indices: ``(mass, weighted mass, sum w v x)``."""
    mass = 0.0
    wmass = 0.0
    dot = 0.0
    for j0 in range(p0, p1, BLOCK_P):
        pj, pm, idx, xg, v = _load_positives(x_row, IDX, VALS, j0, p1, HAS_VALUES, BLOCK_P)
        vw = v * tl.load(W + idx, mask=pm, other=0.0).to(tl.float32) if HAS_WEIGHT else v
        mass += tl.sum(v, 0)
        wmass += tl.sum(vw, 0)
        dot += tl.sum(vw * xg, 0)
    return mass, wmass, dot


@triton.jit
def _target_entries(x_row, IDX, VALS, W, SCRATCH, p0, p1, lo, hi, lse, a, bt, bs, HAS_VALUES: tl.constexpr,
                    HAS_WEIGHT: tl.constexpr, HAS_SMOOTH: tl.constexpr, BLOCK_P: tl.constexpr):
    """Exact fp32 gradient entries of the positives in columns ``[lo, hi)``, into ``SCRATCH`` ``[nnz]``.

    Run before the gradient pass, so that an in-place pass cannot have overwritten their logits; it ends at a
    barrier, since the pass's stores come from other threads (other warps) than these loads, and a warp that ran
    ahead could overwrite a positive's logit before it is read (seen on an H200 under load: a positive's
    entry lost its softmax term).
    """
    for j0 in range(p0, p1, BLOCK_P):
        pj, pm, idx, xg, v = _load_positives(x_row, IDX, VALS, j0, p1, HAS_VALUES, BLOCK_P)
        mine = pm & (idx >= lo) & (idx < hi)
        val = tl.exp2((xg - lse) * LOG2E) * a
        if HAS_WEIGHT:
            wg = tl.load(W + idx, mask=pm, other=0.0).to(tl.float32)
            val = val - v * wg * bt
            if HAS_SMOOTH:
                val = val - bs * wg
        else:
            val = val - v * bt
            if HAS_SMOOTH:
                val = val - bs
        tl.store(SCRATCH + pj, val, mask=mine)
    tl.debug_barrier()


@triton.jit
def _grad_block(x_base, g_base, t_base, w_base, offs, mask, lse, a, bt, bs, HAS_DENSE: tl.constexpr,
                HAS_WEIGHT: tl.constexpr, HAS_SMOOTH: tl.constexpr, EVICT_STORE: tl.constexpr):
    """The columns ``offs`` (where ``mask``) of the bases of ``a softmax - bt w t - bs w``, each entry in fp32,
    rounded once; stored ``evict_first`` with ``EVICT_STORE``."""
    x = tl.load(x_base + offs, mask=mask, other=float("-inf"), eviction_policy="evict_first").to(tl.float32)
    g = tl.exp2((x - lse) * LOG2E) * a
    if HAS_WEIGHT:
        w = tl.load(w_base + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_DENSE:
        t = tl.load(t_base + offs, mask=mask, other=0, eviction_policy="evict_first").to(tl.float32)
        g = g - (t * w if HAS_WEIGHT else t) * bt
    if HAS_SMOOTH:
        g = g - (bs * w if HAS_WEIGHT else bs)
    tl.store(g_base + offs, g.to(g_base.dtype.element_ty), mask=mask,
             eviction_policy="evict_first" if EVICT_STORE else "")


@triton.jit
def _grad_pass(x_row, g_row, t_row, W, lo, hi, lse, a, bt, bs, HAS_DENSE: tl.constexpr, HAS_WEIGHT: tl.constexpr,
               HAS_SMOOTH: tl.constexpr, REVERSE: tl.constexpr, EVICT_STORE: tl.constexpr, PEEL: tl.constexpr,
               G_ALIGNED: tl.constexpr, BLOCK: tl.constexpr, STAGES: tl.constexpr = 1):
    """Second pass over columns ``[lo, hi)``: the aligned body and the edges as in :func:`_stream_stats`; with
    ``REVERSE`` from the last block back, so that the blocks that the first pass read last (the likeliest still in
    L2) are re-read first. ``G_ALIGNED``: the gradient's rows are as far from a 16-byte boundary as the logits'
    (the launcher checks), so that its body stores are 128-bit too."""
    b0, v1, xb = _aligned_body(x_row, lo, hi, PEEL)
    gb = tl.multiple_of(g_row + b0, ALIGN_BYTES) if PEEL and G_ALIGNED else g_row + b0
    last = (tl.cdiv(v1 - b0, BLOCK) - 1) * BLOCK  # the body's last block
    # 1. the body (the loop's form, a plain range for both directions, kept registers at the old count)
    for k0 in tl.range(0, v1 - b0, BLOCK, num_stages=STAGES):
        offs = (last - k0 if REVERSE else k0) + tl.arange(0, BLOCK)  # [BLOCK]
        _grad_block(xb, gb, t_row + b0, W + b0, offs, offs < v1 - b0, lse, a, bt, bs, HAS_DENSE, HAS_WEIGHT,
                    HAS_SMOOTH, EVICT_STORE)
    # 2. the head and the rest
    if PEEL:
        if (b0 > lo) | (v1 < hi):
            offs, mask = _edges(lo, b0, v1, hi)  # [EDGE_BLOCK]
            _grad_block(x_row, g_row, t_row, W, offs, mask, lse, a, bt, bs, HAS_DENSE, HAS_WEIGHT, HAS_SMOOTH,
                        EVICT_STORE)


@triton.jit
def _write_target_entries(g_row, IDX, SCRATCH, p0, p1, lo, hi, BLOCK_P: tl.constexpr):
    """After every thread's gradient stores: the exact entries of the positives in ``[lo, hi)``."""
    tl.debug_barrier()
    for j0 in range(p0, p1, BLOCK_P):
        pj = j0 + tl.arange(0, BLOCK_P)
        pm = pj < p1
        idx = tl.load(IDX + pj, mask=pm, other=0)
        mine = pm & (idx >= lo) & (idx < hi)
        val = tl.load(SCRATCH + pj, mask=mine, other=0.0)
        tl.store(g_row + idx, val.to(g_row.dtype.element_ty), mask=mine)


@triton.jit
def _row_terms(m, s, mass, wmass, dot, sx, wsum, rs, K, eps, HAS_SMOOTH: tl.constexpr):
    """A row's ``(lse, rs * loss, a, bt, bs)`` from its merged sums (max, sum-exp relative to it, target sums).

    ``loss = c lse - (1 - eps) dot / mass - eps/K sx`` with ``c = (1 - eps) wmass / mass + eps/K wsum``,
    zero on empty rows; the gradient is ``a softmax - w (bt t + bs)`` (see :mod:`.torch_chunked`).
    """
    m_fin = tl.where(m == float("-inf"), 0.0, m)
    lse = m_fin + tl.log2(s) / LOG2E
    nonempty = mass > 0
    inv_mass = tl.where(nonempty, 1.0 / tl.where(nonempty, mass, 1.0), 0.0)
    coef = tl.where(nonempty, (1.0 - eps) * wmass * inv_mass + eps / K * wsum, 0.0)
    loss = coef * lse - (1.0 - eps) * dot * inv_mass
    if HAS_SMOOTH:
        loss = loss - eps / K * sx
    loss = tl.where(nonempty, loss, 0.0)
    a = coef * rs  # scale of the softmax
    bt = (1.0 - eps) * inv_mass * rs  # scale of the target weights
    bs = tl.where(nonempty, eps / K * rs, 0.0)  # the smoothing mass
    return lse, loss * rs, a, bt, bs


@triton.jit
def _merge_slices(st_row, S, BLOCK_S: tl.constexpr):
    """A row's ``S`` slice records ``[S, 6]`` (max, sum-exp relative to it, mass, wmass, dot, sum w x), merged:
    log-sum-exp of the parts (an all -inf row keeps max -inf and sum 0), plain sums of the rest.

    Read at L2 (``.cg``): other programs wrote them.
    """
    sl = tl.arange(0, BLOCK_S)
    sm = sl < S
    st = st_row + sl * 6  # [BLOCK_S]
    return _merge_parts(tl.load(st + 0, mask=sm, other=float("-inf"), cache_modifier=".cg"),
                        tl.load(st + 1, mask=sm, other=0.0, cache_modifier=".cg"),
                        tl.load(st + 2, mask=sm, other=0.0, cache_modifier=".cg"),
                        tl.load(st + 3, mask=sm, other=0.0, cache_modifier=".cg"),
                        tl.load(st + 4, mask=sm, other=0.0, cache_modifier=".cg"),
                        tl.load(st + 5, mask=sm, other=0.0, cache_modifier=".cg"))


@triton.jit
def _merge_parts(m_part, s_part, mass, wmass, dot, sx):
    """Slices' partial statistics ``[BLOCK_S]`` each (an unused slot: max -inf, the rest 0), merged as in
    :func:`_merge_slices`."""
    m = tl.max(m_part, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    s = tl.sum(tl.where(m_part == float("-inf"), 0.0, s_part * tl.exp2((m_part - m_safe) * LOG2E)), 0)
    return m, s, tl.sum(mass, 0), tl.sum(wmass, 0), tl.sum(dot, 0), tl.sum(sx, 0)


@triton.jit
def _pack2(a, b):
    """Two fp32 scalars in one int64 word (``a`` the low half): a record that one 64-bit access writes or reads
    whole. -1 (every bit set: two NaNs) marks a word not yet written, so such a pair is stored as -2, two NaNs
    still."""
    w = (a.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF) | (b.to(tl.int32, bitcast=True).to(tl.int64) << 32)
    return tl.where(w == -1, -2, w)


@triton.jit
def _unpack2(w):
    """The two fp32 values of :func:`_pack2`'s words (any shape)."""
    return w.to(tl.int32).to(tl.float32, bitcast=True), (w >> 32).to(tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def _load_records(rec_row, S, BLOCK_S: tl.constexpr):
    """A row's ``S`` packed records ``[S, 3]`` (int64: (max, sum-exp), (mass, wmass), (dot, sum w x)), read with
    relaxed (volatile) loads that other programs' writes in this launch reach: ``(w0, w1, w2, missing)``, each
    word ``[BLOCK_S]``, and how many words of the row are not written yet."""
    sl = tl.arange(0, BLOCK_S)
    sm = sl < S
    r = rec_row + sl * 3  # [BLOCK_S]
    w0 = tl.load(r + 0, mask=sm, other=0, volatile=True)
    w1 = tl.load(r + 1, mask=sm, other=0, volatile=True)
    w2 = tl.load(r + 2, mask=sm, other=0, volatile=True)
    missing = tl.sum(tl.where(sm, (w0 == -1).to(tl.int32) + (w1 == -1).to(tl.int32) + (w2 == -1).to(tl.int32), 0),
                     0)
    return w0, w1, w2, missing


@triton.jit
def _merge_records(w0, w1, w2, S, BLOCK_S: tl.constexpr):
    """:func:`_load_records`' words, all written, merged as in :func:`_merge_slices`."""
    sm = tl.arange(0, BLOCK_S) < S
    m_part, s_part = _unpack2(w0)
    mass, wmass = _unpack2(w1)
    dot, sx = _unpack2(w2)
    return _merge_parts(tl.where(sm, m_part, float("-inf")), tl.where(sm, s_part, 0.0), tl.where(sm, mass, 0.0),
                        tl.where(sm, wmass, 0.0), tl.where(sm, dot, 0.0), tl.where(sm, sx, 0.0))


@triton.jit
def _msl_fwd_kernel(
    X, stride_x,  # [B, K] logits
    G, stride_g,  # [B, K] gradient out (may alias X)
    T, stride_t,  # [B, K] dense target (HAS_DENSE)
    IDX, OFFS, VALS,  # CSR target: [nnz] indices, [B + 1] offsets, [nnz] values (HAS_SPARSE)
    SCRATCH,  # [nnz] fp32 target-entry gradients (HAS_SPARSE)
    W,  # [K] class weights (HAS_WEIGHT)
    RS,  # [B] row scale (reduction and sample weights)
    LOSS,  # [B] fp32 out: row_scale * loss
    B, K, eps,
    HAS_DENSE: tl.constexpr, HAS_SPARSE: tl.constexpr, HAS_VALUES: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTH: tl.constexpr, COMPUTE_GRAD: tl.constexpr, REVERSE: tl.constexpr, EVICT_STORE: tl.constexpr,
    PEEL: tl.constexpr, G_ALIGNED: tl.constexpr, BLOCK: tl.constexpr, BLOCK_P: tl.constexpr,
    STAGES: tl.constexpr,
):
    # 0. a persistent loop: program p takes rows p, p + P, ... (P = B: one row each; fewer caps rows in flight)
    for row in range(tl.program_id(0).to(tl.int64), B, tl.num_programs(0)):  # int64 rows: B * K may pass 2^31
        x_row = X + row * stride_x
        t_row = T + row * stride_t

        # 1. one streaming pass: online max / sum-exp, and the dense target's sums
        m, s, mass, wmass, dot, sx, wsum = _stream_stats(x_row, t_row, W, 0, K, HAS_DENSE, HAS_WEIGHT, HAS_SMOOTH,
                                                         PEEL, BLOCK, STAGES)
        if HAS_SPARSE:
            # 2. the positives: gather their logits from the CSR indices
            p0 = tl.load(OFFS + row)
            p1 = tl.load(OFFS + row + 1)
            mass, wmass, dot = _sparse_stats(x_row, IDX, VALS, W, p0, p1, HAS_VALUES, HAS_WEIGHT, BLOCK_P)

        # 3. the row's loss: c * lse - sum_k T_k x_k, zero on empty rows, and the gradient's scales
        if not HAS_WEIGHT:
            wsum = K * 1.0
        rs = tl.load(RS + row).to(tl.float32)
        lse, loss, a, bt, bs = _row_terms(m, s, mass, wmass, dot, sx, wsum, rs, K, eps, HAS_SMOOTH)
        tl.store(LOSS + row, loss)

        if COMPUTE_GRAD:
            g_row = G + row * stride_g
            if HAS_SPARSE:
                # 4. target entries in fp32, before pass 2 may overwrite the logits (inplace)
                _target_entries(x_row, IDX, VALS, W, SCRATCH, p0, p1, 0, K, lse, a, bt, bs, HAS_VALUES, HAS_WEIGHT,
                                HAS_SMOOTH, BLOCK_P)
            # 5. second pass: the gradient, re-reading the row from L2 where it fits
            _grad_pass(x_row, g_row, t_row, W, 0, K, lse, a, bt, bs, HAS_DENSE, HAS_WEIGHT, HAS_SMOOTH, REVERSE,
                       EVICT_STORE, PEEL, G_ALIGNED, BLOCK, STAGES)
            if HAS_SPARSE:
                # 6. the exact target entries, over pass 2's
                _write_target_entries(g_row, IDX, SCRATCH, p0, p1, 0, K, BLOCK_P)


@triton.jit
def _slice_stats(x_row, t_row, IDX, OFFS, VALS, W, row, split, lo, hi, HAS_DENSE: tl.constexpr,
                 HAS_SPARSE: tl.constexpr, HAS_VALUES: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                 HAS_SMOOTH: tl.constexpr, PEEL: tl.constexpr, BLOCK: tl.constexpr, BLOCK_P: tl.constexpr,
                 STAGES: tl.constexpr = 1):
    """Partial statistics of columns ``[lo, hi)``, slice ``split`` of a row: ``(max, sum-exp, mass, wmass, dot,
    sum w x)``; a sparse target's positives are gathered by the row's first slice alone."""
    m, s, mass, wmass, dot, sx, _ = _stream_stats(x_row, t_row, W, lo, hi, HAS_DENSE, HAS_WEIGHT, HAS_SMOOTH, PEEL,
                                                  BLOCK, STAGES)
    if HAS_SPARSE:
        if split == 0:
            mass, wmass, dot = _sparse_stats(x_row, IDX, VALS, W, tl.load(OFFS + row), tl.load(OFFS + row + 1),
                                             HAS_VALUES, HAS_WEIGHT, BLOCK_P)
    return m, s, mass, wmass, dot, sx


@triton.jit
def _slice_grad(x_row, g_row, t_row, IDX, OFFS, VALS, SCRATCH, W, row, lo, hi, lse, a, bt, bs,
                HAS_DENSE: tl.constexpr, HAS_SPARSE: tl.constexpr, HAS_VALUES: tl.constexpr,
                HAS_WEIGHT: tl.constexpr, HAS_SMOOTH: tl.constexpr, REVERSE: tl.constexpr, EVICT_STORE: tl.constexpr,
                PEEL: tl.constexpr, G_ALIGNED: tl.constexpr, BLOCK: tl.constexpr, BLOCK_P: tl.constexpr,
                STAGES: tl.constexpr = 1):
    """Columns ``[lo, hi)`` of a row's gradient: its positives' exact entries in fp32 first (before the pass may
    overwrite their logits), the pass, then those entries over the pass's."""
    if HAS_SPARSE:
        p0 = tl.load(OFFS + row)
        p1 = tl.load(OFFS + row + 1)
        _target_entries(x_row, IDX, VALS, W, SCRATCH, p0, p1, lo, hi, lse, a, bt, bs, HAS_VALUES, HAS_WEIGHT,
                        HAS_SMOOTH, BLOCK_P)
    _grad_pass(x_row, g_row, t_row, W, lo, hi, lse, a, bt, bs, HAS_DENSE, HAS_WEIGHT, HAS_SMOOTH, REVERSE,
               EVICT_STORE, PEEL, G_ALIGNED, BLOCK, STAGES)
    if HAS_SPARSE:
        _write_target_entries(g_row, IDX, SCRATCH, p0, p1, lo, hi, BLOCK_P)


@triton.jit
def _msl_lagged_kernel(
    X, stride_x,  # [B, K] logits
    G, stride_g,  # [B, K] gradient out (may alias X)
    T, stride_t,  # [B, K] dense target (HAS_DENSE)
    IDX, OFFS, VALS, SCRATCH,  # CSR target and [nnz] fp32 scratch (HAS_SPARSE)
    W,  # [K] class weights (HAS_WEIGHT)
    WSUM,  # [] fp32 sum of the class weights (HAS_WEIGHT)
    RS,  # [B] row scale
    LOSS,  # [B] fp32 out: row_scale * loss
    REC,  # [B, S, 3] int64, -1 (not written) from the launcher: each slice's statistics, two fp32 a word
    B, K, S, SPAN, eps,
    HAS_DENSE: tl.constexpr, HAS_SPARSE: tl.constexpr, HAS_VALUES: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTH: tl.constexpr, REVERSE: tl.constexpr, EVICT_STORE: tl.constexpr, PEEL: tl.constexpr,
    G_ALIGNED: tl.constexpr,
    PHASE: tl.constexpr,  # 2: both parts, lagged; 0 / 1: the statistics / the gradients alone (the interpreter)
    LAG: tl.constexpr, BLOCK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr, STAGES: tl.constexpr,
):
    # 0. items: slice i % S of row i // S, so that a row's slices are consecutive. Program p (of P, all resident)
    #    takes items p, p + P, ... in turn: at step t it streams the statistics of its item t and writes the
    #    gradient of its item t - LAG. That item's row was covered by step t - LAG + (S - 1) // P + 1 <= t (the
    #    launcher sets LAG so), so its records are in (a wait is rare, and never for a step after t: no
    #    deadlock), and its slice is re-read LAG steps after its first read, with only about LAG * P slices read
    #    since: from L2, whatever the row's length.
    pid = tl.program_id(0)
    P = tl.num_programs(0)
    mine = tl.cdiv(B * S - pid, P)  # this program's items (the launcher keeps P <= B * S)
    lag = LAG if PHASE == 2 else 0
    for t in range(mine + lag):
        # 1. the records of the row whose gradient this step writes, asked for first: they arrive during step 2
        ig = pid + tl.maximum(t - lag, 0) * P
        row_g = (ig // S).to(tl.int64)  # int64 rows: B * K may pass 2^31
        rec_g = REC + row_g * S * 3
        w0, w1, w2, missing = _load_records(rec_g, S, BLOCK_S)
        if PHASE != 1:
            if t < mine:
                # 2. this step's item: the statistics of its slice, published as three words
                i = pid + t * P
                row = (i // S).to(tl.int64)
                split = i % S
                lo = split * SPAN
                m, s, mass, wmass, dot, sx = _slice_stats(X + row * stride_x, T + row * stride_t, IDX, OFFS, VALS, W,
                                                          row, split, lo, tl.minimum(lo + SPAN, K), HAS_DENSE,
                                                          HAS_SPARSE, HAS_VALUES, HAS_WEIGHT, HAS_SMOOTH, PEEL, BLOCK,
                                                          BLOCK_P, STAGES)
                rec = REC + (row * S + split) * 3
                tl.atomic_xchg(rec + 0, _pack2(m, s), sem="relaxed")
                tl.atomic_xchg(rec + 1, _pack2(mass, wmass), sem="relaxed")
                tl.atomic_xchg(rec + 2, _pack2(dot, sx), sem="relaxed")
        if PHASE != 0:
            if t >= lag:
                # 3. the rest of that row's records, if some were not in yet (each word carries its own data, so
                #    a word seen written is read whole; the slices' logits are read before their words are written)
                while missing > 0:
                    w0, w1, w2, missing = _load_records(rec_g, S, BLOCK_S)
                m, s, mass, wmass, dot, sx = _merge_records(w0, w1, w2, S, BLOCK_S)
                # 4. the row's loss (by its first slice) and the gradient's scales
                wsum = tl.load(WSUM) if HAS_WEIGHT else K * 1.0
                rs = tl.load(RS + row_g).to(tl.float32)
                lse, loss, a, bt, bs = _row_terms(m, s, mass, wmass, dot, sx, wsum, rs, K, eps, HAS_SMOOTH)
                split_g = ig % S
                if split_g == 0:
                    tl.store(LOSS + row_g, loss)
                # 5. the slice's gradient, re-read from L2
                lo_g = split_g * SPAN
                _slice_grad(X + row_g * stride_x, G + row_g * stride_g, T + row_g * stride_t, IDX, OFFS, VALS,
                            SCRATCH, W, row_g, lo_g, tl.minimum(lo_g + SPAN, K), lse, a, bt, bs, HAS_DENSE,
                            HAS_SPARSE, HAS_VALUES, HAS_WEIGHT, HAS_SMOOTH, REVERSE, EVICT_STORE, PEEL, G_ALIGNED,
                            BLOCK, BLOCK_P, STAGES)


@triton.jit
def _msl_split_stats_kernel(
    X, stride_x,  # [B, K] logits
    T, stride_t,  # [B, K] dense target (HAS_DENSE)
    IDX, OFFS, VALS,  # CSR target (HAS_SPARSE): gathered by the first slice of each row
    W,  # [K] class weights (HAS_WEIGHT)
    STATS,  # [B, S, 6] fp32 out: max, sum-exp (relative to max), mass, wmass, dot, sum w x
    K, SPAN, S,
    HAS_DENSE: tl.constexpr, HAS_SPARSE: tl.constexpr, HAS_VALUES: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTH: tl.constexpr, PEEL: tl.constexpr, BLOCK: tl.constexpr, BLOCK_P: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    lo = split * SPAN
    # 1-2. one streaming pass over this program's slice of the row, and the positives (by its first slice)
    m, s, mass, wmass, dot, sx = _slice_stats(X + row * stride_x, T + row * stride_t, IDX, OFFS, VALS, W, row, split,
                                              lo, tl.minimum(lo + SPAN, K), HAS_DENSE, HAS_SPARSE, HAS_VALUES,
                                              HAS_WEIGHT, HAS_SMOOTH, PEEL, BLOCK, BLOCK_P)
    # 3. the slice's partial statistics, combined across slices by the launcher
    out = STATS + (row * S + split) * 6
    tl.store(out + 0, m)
    tl.store(out + 1, s)
    tl.store(out + 2, mass)
    tl.store(out + 3, wmass)
    tl.store(out + 4, dot)
    tl.store(out + 5, sx)


@triton.jit
def _msl_split_combine_kernel(
    STATS,  # [B, S, 6] fp32 partial statistics of the slices (see _msl_split_stats_kernel)
    WSUM,  # [] fp32 sum of the class weights (HAS_WEIGHT)
    RS,  # [B] row scale
    LOSS,  # [B] fp32 out: row_scale * loss
    COEF,  # [B, 4] fp32 out: lse, scale of the softmax, of the target, of the smoothing mass
    S, K, eps,
    HAS_WEIGHT: tl.constexpr, HAS_SMOOTH: tl.constexpr, BLOCK_S: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    # 1-2. the row's slices, merged
    m, s, mass, wmass, dot, sx = _merge_slices(STATS + row * S * 6, S, BLOCK_S)
    wsum = tl.load(WSUM) if HAS_WEIGHT else K * 1.0
    # 3. the row's loss and the gradient's scales, as in the one-row kernel
    rs = tl.load(RS + row).to(tl.float32)
    lse, loss, a, bt, bs = _row_terms(m, s, mass, wmass, dot, sx, wsum, rs, K, eps, HAS_SMOOTH)
    tl.store(LOSS + row, loss)
    tl.store(COEF + row * 4 + 0, lse)
    tl.store(COEF + row * 4 + 1, a)
    tl.store(COEF + row * 4 + 2, bt)
    tl.store(COEF + row * 4 + 3, bs)


@triton.jit
def _msl_split_grad_kernel(
    X, stride_x,  # [B, K] logits
    G, stride_g,  # [B, K] gradient out (may alias X)
    T, stride_t,  # [B, K] dense target (HAS_DENSE)
    IDX, OFFS, VALS, SCRATCH,  # CSR target and [nnz] fp32 scratch (HAS_SPARSE)
    W,  # [K] class weights (HAS_WEIGHT)
    COEF,  # [B, 4] fp32: lse, scale of the softmax, of the target, of the smoothing mass
    K, SPAN,
    HAS_DENSE: tl.constexpr, HAS_SPARSE: tl.constexpr, HAS_VALUES: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTH: tl.constexpr, REVERSE: tl.constexpr, PEEL: tl.constexpr, G_ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_P: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    if REVERSE:  # the programs in the opposite order to the statistics kernel's: the last slices read come first
        row = tl.num_programs(0) - 1 - row
        split = tl.num_programs(1) - 1 - split
    lse = tl.load(COEF + row * 4 + 0)
    a = tl.load(COEF + row * 4 + 1)
    bt = tl.load(COEF + row * 4 + 2)
    bs = tl.load(COEF + row * 4 + 3)
    lo = split * SPAN
    # 1-3. this slice of the gradient, its positives' exact entries computed first and written last
    _slice_grad(X + row * stride_x, G + row * stride_g, T + row * stride_t, IDX, OFFS, VALS, SCRATCH, W, row, lo,
                tl.minimum(lo + SPAN, K), lse, a, bt, bs, HAS_DENSE, HAS_SPARSE, HAS_VALUES, HAS_WEIGHT, HAS_SMOOTH,
                REVERSE, False, PEEL, G_ALIGNED, BLOCK, BLOCK_P)


@triton.jit
def _scale_block(base, offs, mask, go):
    """``base[offs] *= go`` where ``mask``, in fp32, rounded once."""
    g = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(base + offs, (g * go).to(base.dtype.element_ty), mask=mask)


@triton.jit
def _scale_rows_kernel(
    G, stride_g,  # [B, K] gradient, scaled in place
    GO, stride_go,  # [B] grad_out per row (stride 0 for a broadcast scalar)
    B, K,
    PEEL: tl.constexpr, BLOCK: tl.constexpr,
):
    # 0. a few programs loop over the rows: a broadcast grad_out of 1 costs one load per row, no launch storm
    for row in range(tl.program_id(0).to(tl.int64), B, tl.num_programs(0)):
        # 1. a row whose grad_out is exactly 1 needs nothing: no load, no store
        go = tl.load(GO + row * stride_go).to(tl.float32)
        if go != 1.0:
            g_row = G + row * stride_g
            # 2. otherwise scale the row in place: whole vectors block by block (peeled as in _stream_stats)
            b0, v1, gb = _aligned_body(g_row, 0, K, PEEL)
            for k0 in range(0, v1 - b0, BLOCK):
                offs = k0 + tl.arange(0, BLOCK)  # [BLOCK]
                _scale_block(gb, offs, offs < v1 - b0, go)
            # 3. the edges
            if PEEL:
                if (b0 > 0) | (v1 < K):
                    offs, mask = _edges(0, b0, v1, K)  # [EDGE_BLOCK]
                    _scale_block(g_row, offs, mask, go)


# --------------------------------------------------------------------------- launchers
def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` in plain Python: Triton's own helpers cost microseconds a call on the host."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two at least ``n`` (``n >= 1``), in plain Python."""
    return 1 << (n - 1).bit_length()


def needs_peel(x: Tensor) -> bool:
    """Whether the kernels must peel the rows of ``x`` ``[B, K]`` to a 16-byte boundary for 128-bit accesses
    (``PEEL``): unless the data pointer, the row stride and ``K`` are all multiples of 16 (bytes, elements,
    elements), which Triton's argument specialization already proves."""
    return not (x.data_ptr() % 16 == 0 and x.stride(0) % 16 == 0 and x.shape[1] % 16 == 0)


def rows_aligned_alike(x: Tensor, g: Tensor) -> bool:
    """Whether every row of ``g`` starts as far past a 16-byte boundary as the same row of ``x`` (both ``[B, K]``,
    same dtype): then the kernels' aligned body, found from ``x``, is aligned in ``g`` too (host values only)."""
    e = x.element_size()
    return (g.data_ptr() - x.data_ptr()) % 16 == 0 and (g.stride(0) - x.stride(0)) * e % 16 == 0


def _block(k: int) -> int:
    cap = INTERPRET_BLOCK if triton_interpreting() else MAX_BLOCK
    return max(16, min(next_pow2(max(k, 1)), cap))


def _num_warps(block: int) -> int:
    return 4 if block <= 2048 else (8 if block <= 8192 else 16)


def forward(
    x: Tensor,  # [B, K]
    dense: Optional[Tensor],  # [B, K]
    indices: Optional[Tensor],  # [nnz]
    offsets: Optional[Tensor],  # [B + 1]
    values: Optional[Tensor],  # [nnz]
    weight: Optional[Tensor],  # [K]
    row_scale: Tensor,  # [B]
    label_smoothing: float,
    compute_grad: bool,
    inplace: bool = False,
    splits: Optional[int] = None,
    programs: Optional[int] = None,
    reverse: Optional[bool] = None,
    lagged: Optional[bool] = None,
) -> tuple[Tensor, Tensor]:
    """Launch the fused kernel: returns ``(row_scale * loss [B] fp32, gradient [B, K] or empty)``.

    ``splits`` programs share each row (default: :func:`num_splits`); with more
    than one, the split-row kernels run instead of the one-program-per-row kernel.
    ``programs`` (default ``ROW_PROGRAMS``, else one per row) is the grid of
    the latter: fewer programs than rows loop over the rows. ``reverse`` (default
    ``REVERSE_GRAD``) runs the gradient pass backwards. ``lagged`` (default
    ``LAGGED``) runs the lagged kernel instead, when the gradient is wanted.
    """
    b, k = x.shape
    if x.stride(-1) != 1:
        if inplace:
            raise ValueError("Expected `logits` to be contiguous in its last dim for inplace=True, but it is not")
        x = x.contiguous()
    if dense is not None and dense.stride(-1) != 1:
        dense = dense.contiguous()
    if dense is not None and dense.dtype == torch.bool:
        dense = dense.view(torch.uint8)
    loss = torch.empty(b, dtype=torch.float32, device=x.device)  # [B]
    if compute_grad:
        grad = x if inplace else torch.empty((b, k), dtype=x.dtype, device=x.device)  # [B, K]
    else:
        grad = torch.empty((0, 0), dtype=x.dtype, device=x.device)
    sparse = indices is not None
    scratch = torch.empty(indices.numel() if sparse else 1, dtype=torch.float32, device=x.device)  # [nnz]
    dummy = loss
    block = _block(k)
    splits = num_splits(b, k, block, x.device) if splits is None else splits
    reverse = REVERSE_GRAD if reverse is None else reverse
    if b and compute_grad and (LAGGED if lagged is None else lagged):
        _forward_lagged(x, grad, loss, dense, indices, offsets, values, weight, row_scale, scratch,
                        float(label_smoothing), block, reverse)
    elif b and splits > 1:
        _forward_split(x, grad, loss, dense, indices, offsets, values, weight, row_scale, scratch,
                       float(label_smoothing), compute_grad, splits, block, reverse)
    elif b:
        programs = max(1, min(b, programs or ROW_PROGRAMS or b))
        _msl_fwd_kernel[(programs,)](
            x, x.stride(0),
            grad, grad.stride(0) if compute_grad else 0,
            dense if dense is not None else dummy, dense.stride(0) if dense is not None else 0,
            indices if sparse else dummy, offsets if sparse else dummy,
            values if values is not None else dummy, scratch,
            weight if weight is not None else dummy,
            row_scale, loss, b, k, float(label_smoothing),
            HAS_DENSE=dense is not None, HAS_SPARSE=sparse, HAS_VALUES=values is not None,
            HAS_WEIGHT=weight is not None, HAS_SMOOTH=label_smoothing > 0, COMPUTE_GRAD=compute_grad,
            REVERSE=reverse, EVICT_STORE=STORE_EVICT_FIRST, PEEL=needs_peel(x),
            G_ALIGNED=compute_grad and rows_aligned_alike(x, grad), BLOCK=block, BLOCK_P=BLOCK_P,
            STAGES=ROW_STAGES, num_warps=ROW_WARPS or _num_warps(block),
        )
    return loss, grad


@functools.cache
def _sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached: the query is not free); 2 under the interpreter."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2


def num_splits(b: int, k: int, block: int, device: torch.device) -> int:
    """Programs per row: enough to fill the GPU (4 per SM) when the batch alone cannot.

    Under the interpreter the machine counts as 2 SMs, so that small test shapes
    exercise both the split-row and the one-program-per-row kernels.
    """
    target = 4 * _sms(device)
    if b >= target or k <= 2 * block:
        return 1
    return max(1, min(cdiv(k, block), cdiv(target, max(b, 1))))


def _slices_args(x, grad, loss, dense, indices, offsets, values, weight, row_scale, scratch) -> tuple:
    """The lagged kernel's arguments ``X`` to ``LOSS`` (``loss`` stands in for the tensors not given, and ``WSUM``
    is the class weights' sum)."""
    dummy = loss
    return (x, x.stride(0), grad, grad.stride(0), dense if dense is not None else dummy,
            dense.stride(0) if dense is not None else 0, indices if indices is not None else dummy,
            offsets if offsets is not None else dummy, values if values is not None else dummy, scratch,
            weight if weight is not None else dummy, weight.float().sum() if weight is not None else dummy,
            row_scale, loss)


def _forward_lagged(x, grad, loss, dense, indices, offsets, values, weight, row_scale, scratch, eps, block, reverse):
    """Lagged path: slices of ``LAGGED_SPAN_BYTES`` (two blocks under the interpreter) streamed in blocks of at
    most ``LAGGED_BLOCK``, ``LAGGED_PER_SM`` programs a SM, one launch (two under the interpreter, which runs
    programs one after another: all the statistics, then all the gradients)."""
    b, k = x.shape
    if triton_interpreting():
        span = 2 * block
    else:
        block = min(block, LAGGED_BLOCK)
        span = cdiv(max(LAGGED_SPAN_BYTES // x.element_size(), 1), block) * block
    n = cdiv(k, span)
    records = torch.full((b, n, 3), -1, dtype=torch.int64, device=x.device)  # [B, S, 3], -1: not written
    args = _slices_args(x, grad, loss, dense, indices, offsets, values, weight, row_scale, scratch) + (
        records, b, k, n, span, eps)
    # a program waits at step t for the statistics of its row's other slices; with every program resident it
    # cannot deadlock while those come from steps <= t (each program reads its own step's slice before it waits):
    # a row of S slices spans at most (S - 1) // P + 1 steps after its first, P >= the SM count
    lag = max(1, LAG, (n - 1) // _sms(x.device) + 1)
    flags = dict(_split_flags(dense, indices, values, weight, eps > 0, block), REVERSE=reverse,
                 EVICT_STORE=STORE_EVICT_FIRST, PEEL=needs_peel(x), G_ALIGNED=rows_aligned_alike(x, grad),
                 LAG=lag, BLOCK_S=max(16, next_pow2(n)), STAGES=ROW_STAGES)
    if triton_interpreting():
        programs = min(b * n, _sms(x.device))
        for phase in (0, 1):
            _msl_lagged_kernel[(programs,)](*args, PHASE=phase, **flags)
        return
    # every program must be resident at once (they wait for each other): never more a SM than the compiled kernel fits
    per_sm = min(LAGGED_PER_SM, resident_per_sm(_msl_lagged_kernel, args, dict(flags, PHASE=2), x.device))
    _msl_lagged_kernel[(min(b * n, _sms(x.device) * per_sm),)](*args, PHASE=2, **flags)


def resident_per_sm(kernel, args, flags, device: torch.device) -> int:
    """How many programs of ``kernel``, compiled for ``args`` and ``flags``, an SM holds at once: by its
    registers, shared memory and threads, as Triton's fused-softmax tutorial counts them; 1 (always resident in a
    grid of one program a SM) where the compiled kernel cannot be inspected."""
    try:
        compiled = kernel.warmup(*args, grid=(1,), **flags)
        compiled._init_handles()  # loads the binary: its register count
        props = triton.runtime.driver.active.utils.get_device_properties(device.index or 0)
        threads = compiled.metadata.num_warps * props["warpSize"]
        by_regs = props["max_num_regs"] // (threads * cdiv(max(compiled.n_regs, 1), 8) * 8)  # 8 a thread at a time
        by_smem = (props["max_shared_mem"] + 1024) // (compiled.metadata.shared + 1024)  # 1 KB reserved a program
        by_threads = torch.cuda.get_device_properties(device).max_threads_per_multi_processor // threads
        return max(1, min(by_regs, by_smem, by_threads))
    except Exception:  # noqa: BLE001 - any Triton version's internals: fall back to the safe count
        return 1


def _forward_split(x, grad, loss, dense, indices, offsets, values, weight, row_scale, scratch, eps, compute_grad,
                   splits, block, reverse):
    """Split-row path: per-slice statistics, one small combine kernel (O(B·S)), then per-slice gradients.

    Three launches in all, whatever the options: at the small batches that take this path the host's cost
    per call, not the GPU's, sets the time.
    """
    stats, span = _split_stats(x, dense, indices, offsets, values, weight, eps > 0, splits, block)  # [B, S, 6]
    finish_from_stats(x, grad, loss, stats, dense, indices, offsets, values, weight, row_scale, scratch, eps,
                      compute_grad, span, block, reverse)


def finish_from_stats(x, grad, loss, stats, dense, indices, offsets, values, weight, row_scale, scratch, eps,
                      compute_grad, span, block, reverse=None):
    """From the partial statistics ``[B, S, 6]`` of ``x`` ``[B, K]`` (all its classes): the row-scaled losses
    into ``loss`` ``[B]`` and, with ``compute_grad``, the gradient into ``grad`` (may alias ``x``) by programs of
    ``span`` columns. The statistics must include the target's sums (a sparse target's in any slice)."""
    b, k = x.shape
    n = stats.shape[1]
    coefs = torch.empty(b, 4, dtype=torch.float32, device=x.device)  # [B, 4]
    wsum = weight.float().sum() if weight is not None else loss  # [] (a dummy pointer without weights)
    # 1. combine the slices: the loss, and each row's log-sum-exp and gradient scales
    _msl_split_combine_kernel[(b,)](
        stats, wsum, row_scale, loss, coefs, n, k, eps,
        HAS_WEIGHT=weight is not None, HAS_SMOOTH=eps > 0, BLOCK_S=max(16, next_pow2(n)),
    )
    if compute_grad:
        # 2. every slice's gradient
        _split_grad(x, grad, coefs, dense, indices, offsets, values, scratch, weight, eps > 0, span, block, reverse)


def grad_span(b: int, k: int, device: torch.device) -> tuple[int, int]:
    """``(block, span)`` of a gradient pass over ``[B, K]`` by :func:`num_splits` programs per row: the columns
    per step, and per program (a multiple of the block)."""
    block = _block(k)
    return block, cdiv(cdiv(k, num_splits(b, k, block, device)), block) * block


def _split_flags(dense, indices, values, weight, smooth, block):
    return dict(HAS_DENSE=dense is not None, HAS_SPARSE=indices is not None, HAS_VALUES=values is not None,
                HAS_WEIGHT=weight is not None, HAS_SMOOTH=smooth, BLOCK=block, BLOCK_P=BLOCK_P,
                num_warps=_num_warps(block))


def _split_stats(x, dense, indices, offsets, values, weight, smooth, splits, block):
    """``(stats [B, S, 6] fp32, span)``: the statistics of ``S`` slices of ``span`` columns of every row."""
    b, k = x.shape
    span = cdiv(cdiv(k, splits), block) * block  # columns per program, a multiple of BLOCK
    splits = cdiv(k, span)
    stats = torch.empty(b, splits, 6, dtype=torch.float32, device=x.device)  # [B, S, 6]
    dummy = stats
    _msl_split_stats_kernel[(b, splits)](
        x, x.stride(0), dense if dense is not None else dummy, dense.stride(0) if dense is not None else 0,
        indices if indices is not None else dummy, offsets if offsets is not None else dummy,
        values if values is not None else dummy, weight if weight is not None else dummy, stats, k, span, splits,
        PEEL=needs_peel(x),
        **_split_flags(dense, indices, values, weight, smooth, block),
    )
    return stats, span


def _split_grad(x, grad, coefs, dense, indices, offsets, values, scratch, weight, smooth, span, block,
                reverse=None):
    """Every slice's gradient into ``grad`` (may alias ``x``), from the per-row ``coefs`` ``[B, 4]``."""
    b, k = x.shape
    dummy = coefs
    _msl_split_grad_kernel[(b, cdiv(k, span))](
        x, x.stride(0), grad, grad.stride(0), dense if dense is not None else dummy,
        dense.stride(0) if dense is not None else 0, indices if indices is not None else dummy,
        offsets if offsets is not None else dummy, values if values is not None else dummy,
        scratch if scratch is not None else dummy, weight if weight is not None else dummy,
        coefs.contiguous(), k, span, REVERSE=REVERSE_GRAD if reverse is None else reverse,
        PEEL=needs_peel(x), G_ALIGNED=rows_aligned_alike(x, grad),
        **_split_flags(dense, indices, values, weight, smooth, block),
    )


def _slab_target(x, dense):
    if x.stride(-1) != 1:
        raise ValueError("Expected a slab contiguous in its last dim")
    if dense is not None and dense.stride(-1) != 1:
        dense = dense.contiguous()
    return dense.view(torch.uint8) if dense is not None and dense.dtype == torch.bool else dense


def pack_coefs(lse: Tensor, a: Tensor, bt: Tensor, bs: Optional[Tensor]) -> Tensor:
    """The gradient kernels' per-row ``[B, 4]`` fp32 input ``[lse, a, bt, bs]`` (``bs`` None: no smoothing)."""
    return torch.stack([lse, a, bt, torch.zeros_like(a) if bs is None else bs], 1).float().contiguous()


def slab_stats(x: Tensor, dense: Optional[Tensor], weight: Optional[Tensor], smooth: bool) -> Tensor:
    """Partial statistics ``[B, S, 6]`` of a slab of columns ``x`` ``[B, C]`` (no sparse target).

    Per row and slice: max, sum-exp relative to it, the dense target's mass,
    weighted mass and ``sum w t x``, and ``sum w x`` (for smoothing).
    """
    b, k = x.shape
    block = _block(k)
    return _split_stats(x, _slab_target(x, dense), None, None, None, weight, smooth, num_splits(b, k, block, x.device),
                        block)[0]


def slab_grad(x: Tensor, coefs: Tensor, dense: Optional[Tensor], weight: Optional[Tensor], smooth: bool,
              out: Optional[Tensor] = None, reverse: Optional[bool] = None) -> Tensor:
    """``a softmax - w (bt t + bs)`` of a slab ``x`` ``[B, C]``, ``coefs = [lse, a, bt, bs]`` ``[B, 4]``, into ``out``.

    ``out`` defaults to ``x`` itself (in place). Each entry is formed in fp32 and
    rounded once; positives of a sparse target are left to the caller (they get
    ``a softmax - w bs`` here). ``reverse`` defaults to ``REVERSE_GRAD``.
    """
    block, span = grad_span(x.shape[0], x.shape[1], x.device)
    out = x if out is None else out
    _split_grad(x, out, coefs, _slab_target(x, dense), None, None, None, None, weight, smooth, span, block, reverse)
    return out


def merge_stats(st: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Slices' statistics ``[B, S, 6]`` (of :func:`slab_stats`) -> per-row fp32 ``(lse, mass, wmass, dot, sx)``.

    Log-sum-exp of the partial ones (a row of -inf parts gets -inf), plain sums of the rest; each ``[B]``
    contiguous, so that the sparse terms can be added in place.
    """
    m, s = torch_chunked.lse_parts(st[..., 0], st[..., 1])  # [B] each
    lse = s.log() + torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return (lse, *st[..., 2:].sum(1).T.contiguous().unbind(0))


def partial_sums(x, dense, indices, row_ids, values, weight, smooth: bool):
    """:func:`.torch_chunked.partial_sums` with one Triton pass over ``x`` ``[B, K]`` (a shard or chunk of classes).

    Returns fp32 ``(lse, dot, mass, wmass, sx)``; the positives' logits of a
    sparse target are gathered in torch.
    """
    x = x if x.stride(-1) == 1 else x.contiguous()
    w = None if weight is None else weight.float()
    lse, mass, wmass, dot, sx = merge_stats(slab_stats(x, dense, w, smooth))  # [B] each
    if indices is not None:
        torch_chunked.add_sparse_sums(x[row_ids, indices].float(), indices, row_ids, values, w, mass, wmass, dot)
    return lse, dot, mass, wmass, (sx if smooth else None)


def backward(grad_rows, x, lse, coef, inv_mass, dense, indices, row_ids, values, weight, label_smoothing: float,
             out: Optional[Tensor] = None, num_classes: Optional[int] = None) -> Tensor:
    """:func:`.torch_chunked.backward` with one Triton pass: ``grad_rows[:, None] * (c softmax(x) - T)`` into ``out``.

    The positives' entries of a sparse target are formed in fp32 and written afterwards. ``out`` may be ``x``
    itself (in place).
    """
    x = x if x.stride(-1) == 1 else x.contiguous()
    k = x.shape[1] if num_classes is None else num_classes
    eps = float(label_smoothing)
    w = None if weight is None else weight.float()
    g = grad_rows.float()
    a, bt, bs = torch_chunked.grad_scales(coef, inv_mass, g, eps, k)  # [B] each
    xg = None if indices is None else x[row_ids, indices].float()  # [nnz], gathered before `out` may overwrite x
    out = torch.empty_like(x, memory_format=torch.contiguous_format) if out is None else out  # [B, K]
    slab_grad(x, pack_coefs(lse, a, bt, bs), dense, w, eps > 0, out=out)
    if indices is not None:
        ent = torch_chunked.target_entries(xg, lse, a, bt, bs, indices, row_ids, values, w)  # [nnz]
        out.index_put_((row_ids, indices), ent.to(out.dtype))
    return out


def scale_rows_(grad: Tensor, grad_out: Tensor) -> Tensor:
    """``grad *= grad_out[:, None]`` in place; rows with ``grad_out == 1`` are left untouched (no host sync)."""
    b, k = grad.shape
    if b and k:
        block = min(_block(k), 4096)
        programs = min(b, 4 * _sms(grad.device))  # each loops over rows: 1s cost a load, others stream
        _scale_rows_kernel[(programs,)](
            grad, grad.stride(0), grad_out, grad_out.stride(0) if grad_out.dim() else 0, b, k,
            PEEL=needs_peel(grad), BLOCK=block, num_warps=_num_warps(block),
        )
    return grad
