"""Triton kernel specifics (under TRITON_INTERPRET=1 on the CPU), dispatch, and GPU-only checks."""

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mlsoftmax import Positives, multilabel_softmax_loss
from mlsoftmax import reference as R
from mlsoftmax.kernels import IMPLS, resolve_impl

from conftest import IMPLS as AVAILABLE, random_multihot

needs_triton = pytest.mark.skipif("triton" not in AVAILABLE, reason="no usable Triton (>= 3.4)")


def test_auto_on_cpu_and_errors_list_choices():
    """auto: torch for small CPU problems, the compiled kernel from COMPILE_MIN_ELEMS logits (with a compiler)."""
    from mlsoftmax.kernels import COMPILE_MIN_ELEMS, compiler_available

    assert resolve_impl("auto", torch.zeros(2, 3)) == "torch"
    big = torch.empty(COMPILE_MIN_ELEMS // 1024, 1024)
    assert resolve_impl("auto", big) == ("compile" if compiler_available() else "torch")
    with pytest.raises(ValueError, match=r"\('auto', 'torch', 'triton', 'compile'\)"):
        resolve_impl("fused", torch.zeros(2, 3))
    assert IMPLS == ("auto", "torch", "triton", "compile")


def test_triton_older_than_the_minimum_is_not_used(monkeypatch):
    """A Triton whose compiler cannot build the kernels (torch 2.4-2.7 ship 3.0-3.3): "auto" takes the torch path on
    CUDA and "triton" raises naming both versions; an interpreter that cannot run with the NumPy found likewise."""
    from types import SimpleNamespace

    from mlsoftmax import kernels

    cuda = SimpleNamespace(device=torch.device("cuda"), dtype=torch.float32, numel=lambda: 1 << 30)
    cpu = torch.zeros(2, 3)
    version = kernels._version
    assert version("numpy") == tuple(int(p) for p in np.__version__.split(".")[:2])
    assert version("no-such-distribution") is None
    assert kernels.MIN_TRITON == (3, 4)
    monkeypatch.setattr(kernels, "_TRITON_FOUND", True)
    monkeypatch.setattr(kernels, "TRITON_VERSION", (3, 3))
    monkeypatch.setattr(kernels, "_TRITON", False)
    assert resolve_impl("auto", cuda) == "torch"
    assert "triton" not in kernels.available_impls(torch.device("cuda"))
    with pytest.raises(ValueError, match=r"needs Triton >= 3\.4; 3\.3 is installed"):
        resolve_impl("triton", cuda)
    monkeypatch.setattr(kernels, "_TRITON_FOUND", False)
    with pytest.raises(ValueError, match="Triton is not installed"):
        resolve_impl("triton", cuda)

    monkeypatch.setattr(kernels, "_TRITON_FOUND", True)
    monkeypatch.setattr(kernels, "_TRITON", True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for triton, numpy, runs in [((3, 6), (2, 4), False), ((3, 6), (2, 3), True), ((3, 7), (2, 4), True),
                                (None, (2, 4), True), ((3, 6), None, True)]:  # unknown versions: trusted
        assert kernels._interpreter_runs_with(triton, numpy) == runs
        monkeypatch.setattr(kernels, "TRITON_VERSION", triton)
        monkeypatch.setattr(kernels, "_INTERPRETER_RUNS", runs)
        assert ("triton" in kernels.available_impls(torch.device("cpu"))) == runs
        assert resolve_impl("auto", cuda) == "triton"  # the interpreter is not the GPU's compiler
        if not runs:
            with pytest.raises(ValueError, match=r"interpreter cannot run with NumPy .*Triton >= 3\.7 or NumPy < 2\.4"):
                resolve_impl("triton", cpu)


def test_auto_takes_pytorchs_own_loss_for_small_problems():
    """Below the measured crossovers (2^15 logits on the CPU, 2^26 on CUDA) "auto" takes F.cross_entropy on the
    dense target, whose host cost per call is the smallest; never for an explicit impl, nor in place."""
    from types import SimpleNamespace

    from mlsoftmax.kernels import CUDA_SMALL_MAX_ELEMS, SMALL_MAX_ELEMS, small_path

    def x(n, dev):  # the predicate reads the device and the size alone: no CUDA tensor needed
        return SimpleNamespace(device=torch.device(dev), numel=lambda: n)

    assert small_path("auto", "torch", x(SMALL_MAX_ELEMS - 1, "cpu"))
    assert not small_path("auto", "torch", x(SMALL_MAX_ELEMS, "cpu"))
    assert not small_path("auto", "compile", x(SMALL_MAX_ELEMS - 1, "cpu"))
    assert CUDA_SMALL_MAX_ELEMS == 1 << 26
    assert small_path("auto", "triton", x(CUDA_SMALL_MAX_ELEMS - 1, "cuda"))
    assert not small_path("auto", "triton", x(CUDA_SMALL_MAX_ELEMS, "cuda"))
    assert not small_path("auto", "triton", x(64, "cuda"), inplace=True)
    assert not small_path("triton", "triton", x(64, "cuda"))
    assert not small_path("torch", "torch", x(64, "cpu"))


@pytest.mark.gpu
@pytest.mark.parametrize("b,k", [(64, 1024), (2048, 32768 + 5)])
def test_gpu_auto_small_and_large_match_oracle(b, k, monkeypatch):
    """"auto" on CUDA below the small-problem bound (PyTorch's own loss) and above it (Triton), and in place
    (always Triton), against the fp64 oracle."""
    from mlsoftmax.kernels import CUDA_SMALL_MAX_ELEMS, torch_chunked

    calls = []
    small_rows = torch_chunked.small_rows
    monkeypatch.setattr(torch_chunked, "small_rows", lambda *a: calls.append(1) or small_rows(*a))
    rng = np.random.default_rng(0)
    s = rng.standard_normal((b, k)) * 3
    y = random_multihot(rng, b, k, p=4 / k)
    ref_loss, ref_grad = R.loss(s, y).mean(), R.grad(s, y) / b
    target = Positives.from_dense(torch.from_numpy(y).cuda())
    for inplace in (False, True):
        z = torch.tensor(s, dtype=torch.float32, device="cuda", requires_grad=True)
        loss = multilabel_softmax_loss(z * 1.0 if inplace else z, target, inplace=inplace)  # a copy to overwrite
        loss.backward()
        assert len(calls) == (b * k < CUDA_SMALL_MAX_ELEMS and not inplace)
        calls.clear()
        np.testing.assert_allclose(loss.item(), ref_loss, rtol=1e-5)
        np.testing.assert_allclose(z.grad.cpu().numpy(), ref_grad, rtol=1e-3, atol=1e-9)


@needs_triton
def test_triton_rejects_fp64_and_inplace_needs_triton():
    with pytest.raises(ValueError, match="float32, bfloat16 or float16 for impl='triton'"):
        multilabel_softmax_loss(torch.zeros(2, 3, dtype=torch.float64), torch.ones(2, 3), impl="triton")
    with pytest.raises(ValueError, match="inplace=True"):
        multilabel_softmax_loss(torch.zeros(2, 3), torch.ones(2, 3), impl="torch", inplace=True)


@needs_triton
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("knobs", [{}, {"REVERSE_GRAD": False}, {"STORE_EVICT_FIRST": True, "ROW_WARPS": 32},
                                   {"ROW_STAGES": 3}, {"LAGGED": True, "STORE_EVICT_FIRST": True}],
                         ids=["default", "forward", "evict_store_32w", "stages3", "lagged"])
def test_inplace_gradient_overwrites_logits(sparse, dtype, knobs, rng, monkeypatch):
    from mlsoftmax.kernels import triton_loss

    for name, value in knobs.items():
        monkeypatch.setattr(triton_loss, name, value)
    b, k = 5, 300  # several blocks per row under the interpreter (several slices per row with lagged)
    y = random_multihot(rng, b, k, p=0.03, empty_rows=[2])
    s = torch.tensor(rng.normal(size=(b, k))).to(dtype)
    s64 = s.double().numpy()
    tgt = Positives.from_lists([np.flatnonzero(r).tolist() for r in y]) if sparse else torch.from_numpy(y)
    x = s.clone().requires_grad_()
    leaf = x.detach()  # shares storage with x
    out = multilabel_softmax_loss(x, tgt, reduction="sum", impl="triton", inplace=True)
    np.testing.assert_allclose(out.double().item(), R.loss(s64, y).sum(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5)
    out.backward()
    # the storage of the logits now holds the gradient, and x.grad is that same tensor
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-6
    np.testing.assert_allclose(leaf.double().numpy(), R.grad(s64, y), atol=tol)
    assert x.grad.data_ptr() == leaf.data_ptr()


@needs_triton
def test_backward_scales_by_grad_out_and_skips_ones(rng):
    b, k = 4, 50
    y = random_multihot(rng, b, k, p=0.1)
    s = rng.normal(size=(b, k)).astype(np.float32)
    g_out = torch.tensor([1.0, 2.0, 1.0, -0.5])
    x = torch.tensor(s, requires_grad=True)
    multilabel_softmax_loss(x, torch.from_numpy(y), reduction="none", impl="triton").backward(g_out)
    expected = R.grad(s.astype(np.float64), y) * g_out.numpy()[:, None]
    np.testing.assert_allclose(x.grad.numpy(), expected, atol=1e-6)


@needs_triton
def test_no_gradient_buffer_without_requires_grad(rng):
    y = random_multihot(rng, 3, 20, p=0.2)
    s = rng.normal(size=(3, 20)).astype(np.float32)
    out = multilabel_softmax_loss(torch.from_numpy(s), torch.from_numpy(y), reduction="none", impl="triton")
    np.testing.assert_allclose(out.numpy(), R.loss(s.astype(np.float64), y), rtol=1e-5)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k", [320, 301])
@pytest.mark.parametrize("b,lagged", [(3, False), (9, False), (9, True)],
                         ids=["split_rows", "row_per_program", "lagged"])
def test_rows_at_any_alignment_match_the_oracle(dtype, k, b, lagged, rng, monkeypatch):
    """Rows that start at every offset from a 16-byte boundary (views into a wider buffer), K a multiple of 16 or
    not, gradient pass either way, in place or not: the kernels peel each row to its first boundary where needed
    (``needs_peel``), stream whole vectors and treat the edges apart; a gradient whose rows sit otherwise than
    the logits' (a fresh buffer for a view) stores unhinted; the backward's scaling pass (grad_out 2) peels
    alike. Under the interpreter 3 rows take the split-row kernels and 9 the one-row kernel (or the lagged
    kernel's slices). Loss and gradient against the fp64 oracle."""
    from mlsoftmax.kernels import triton_loss

    monkeypatch.setattr(triton_loss, "LAGGED", lagged)
    esize = torch.finfo(dtype).bits // 8
    y = random_multihot(rng, b, k, p=0.03, empty_rows=[1])
    tgt = Positives.from_lists([np.flatnonzero(r).tolist() for r in y])
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    # offsets of 0, 2, 4 and 14 bytes in 16-bit dtypes, 0, 4, 8 and 12 (mod 16) in fp32
    for off, (reverse, inplace) in itertools.product((0, 1, 2, 7), ((True, False), (False, True), (True, True))):
        monkeypatch.setattr(triton_loss, "REVERSE_GRAD", reverse)
        buf = torch.tensor(rng.normal(size=(b, k + 16)) * 3).to(dtype)  # rows of 336 or 317 columns
        x = buf[:, off:off + k]  # each row starts off columns past the buffer's
        assert triton_loss.needs_peel(x) == (buf.data_ptr() % 16 != 0 or off * esize % 16 != 0 or k % 16 != 0)
        s64 = x.double().numpy()
        z = (buf.clone()[:, off:off + k] if inplace else x).requires_grad_()  # a copy at the same offsets to overwrite
        leaf = z.detach()
        out = multilabel_softmax_loss(z, tgt, reduction="sum", impl="triton", inplace=inplace)
        np.testing.assert_allclose(out.double().item(), R.loss(s64, y).sum(), rtol=tol["rtol"])
        out.backward(torch.tensor(2.0, dtype=out.dtype))  # not 1: the backward's scaling kernel runs too
        grad = (leaf if inplace else z.grad).double().numpy()
        np.testing.assert_allclose(grad, 2 * R.grad(s64, y), **tol, err_msg=f"offset {off}, reverse {reverse}")


if "triton" in AVAILABLE:  # a kernel that reports _aligned_body's split of [lo, hi) for each row
    import triton
    import triton.language as tl

    from mlsoftmax.kernels.triton_loss import _aligned_body, _pack2, _unpack2

    @triton.jit
    def _probe_aligned_body(X, stride, LO, HI, OUT):
        row = tl.program_id(0)
        b0, v1, _ = _aligned_body(X + row * stride, tl.load(LO + row), tl.load(HI + row), True)
        tl.store(OUT + row * 2, b0)
        tl.store(OUT + row * 2 + 1, v1)

    @triton.jit
    def _probe_records(A, B, W, A2, B2):  # the lagged kernel's words: pack pairs, then unpack them
        i = tl.program_id(0)
        w = _pack2(tl.load(A + i), tl.load(B + i))
        tl.store(W + i, w)
        a, b = _unpack2(w)
        tl.store(A2 + i, a)
        tl.store(B2 + i, b)


@needs_triton
def test_packed_records_round_trip_and_never_look_unwritten():
    """The lagged kernel's records: two fp32 values a 64-bit word come back bit for bit (infinities, subnormals,
    zeros of either sign), and the one pair whose word would read as "not written" (-1: two all-ones NaNs) is
    stored as another word of two NaNs."""
    # 1.5, -inf, the least subnormal, -0, the largest float, an all-ones NaN; 2.25, +0, a negative subnormal,
    # +inf, the least normal, an all-ones NaN
    a_bits = torch.tensor([0x3FC00000, 0xFF800000, 0x00000001, 0x80000000, 0x7F7FFFFF, 0xFFFFFFFF]).to(torch.int32)
    b_bits = torch.tensor([0x40100000, 0x00000000, 0x807FFFFF, 0x7F800000, 0x00800000, 0xFFFFFFFF]).to(torch.int32)
    words = torch.zeros(6, dtype=torch.int64)
    a2, b2 = torch.zeros(6), torch.zeros(6)
    _probe_records[(6,)](a_bits.view(torch.float32), b_bits.view(torch.float32), words, a2, b2)
    assert torch.equal(a2[:-1].view(torch.int32), a_bits[:-1]) and torch.equal(b2[:-1].view(torch.int32), b_bits[:-1])
    expected = (a_bits.to(torch.int64) & 0xFFFFFFFF) | (b_bits.to(torch.int64) << 32)  # a the low half, b the high
    assert torch.equal(words[:-1], expected[:-1]) and (words != -1).all()
    assert words[-1] == -2 and a2[-1].isnan() and b2[-1].isnan()


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_aligned_body_starts_on_a_16_byte_boundary(dtype):
    """``_aligned_body`` under the interpreter (which hands kernels the tensors' real addresses): for rows starting
    anywhere, the body starts at the first 16-byte boundary at or past ``lo`` (fewer than a vector's columns in),
    ends on a whole vector, and stays inside ``[lo, hi)``. The compiled kernels promise the compiler exactly this
    (``tl.multiple_of``), so a wrong head would be a misaligned vector access on a GPU."""
    esize = torch.finfo(dtype).bits // 8
    vec = 16 // esize
    buf = torch.zeros(40, 61, dtype=dtype)  # rows 122 or 244 bytes apart: every offset from a boundary
    lo = torch.tensor([0, 1, 2, 3, 5, 8, 9, 17] * 5, dtype=torch.int32)
    hi = torch.minimum(lo + torch.tensor([0, 1, 3, 7, 8, 9, 16, 23, 40, 44] * 4, dtype=torch.int32),
                       torch.tensor(61, dtype=torch.int32))
    out = torch.zeros(40, 2, dtype=torch.int32)
    _probe_aligned_body[(40,)](buf, buf.stride(0), lo, hi, out)
    for r, (b0, v1) in enumerate(out.tolist()):
        start = buf.data_ptr() + (r * buf.stride(0) + lo[r].item()) * esize  # the address of column lo
        head = (-start % 16) // esize  # columns to the first boundary
        assert b0 == lo[r] + min(head, hi[r] - lo[r]), r
        assert lo[r] <= b0 <= v1 <= hi[r] and (v1 - b0) % vec == 0 and hi[r] - v1 < vec, r
        if b0 < v1:
            assert (buf.data_ptr() + (r * buf.stride(0) + b0) * esize) % 16 == 0, r


def test_peel_and_gradient_alignment_predicates():
    """The launchers' host-side tests of alignment (no kernel): rows and K whole 16-byte vectors need no peeling;
    a gradient buffer is aligned like the logits when its rows sit at the same offsets from a 16-byte boundary."""
    from mlsoftmax.kernels.triton_loss import needs_peel, rows_aligned_alike

    buf = torch.zeros(4, 48, dtype=torch.bfloat16)
    assert buf.data_ptr() % 16 == 0  # PyTorch's CPU allocations are 64-byte aligned
    assert not needs_peel(buf[:, :32])  # stride 48, K 32, aligned start
    assert not needs_peel(buf[:, 8:40])  # 8 bf16 = 16 bytes in
    assert needs_peel(buf[:, 1:33])  # starts 2 bytes past a boundary
    assert needs_peel(buf[:, :31])  # K = 31
    assert needs_peel(torch.zeros(4, 40, dtype=torch.bfloat16)[:, :32])  # stride 40
    x = buf[:, 1:33]
    assert rows_aligned_alike(x, x)  # in place
    assert not rows_aligned_alike(x, torch.empty(4, 32, dtype=torch.bfloat16))  # fresh buffer: rows at 0, not 2
    assert rows_aligned_alike(x, torch.zeros(4, 48, dtype=torch.bfloat16)[:, 1:33])  # the same view elsewhere
    assert not rows_aligned_alike(x, torch.zeros(4, 44, dtype=torch.bfloat16)[:, 1:33])  # rows 8 bytes apart


# ----------------------------------------------------------------------------- GPU only
@needs_triton
@pytest.mark.parametrize("splits,programs,reverse,lagged", [
    (1, None, False, False), (2, None, False, False), (3, None, False, False), (7, None, False, False),
    (1, 1, False, False), (1, 2, False, False), (1, None, True, False), (3, None, True, False),
    (7, None, True, False), (1, 2, True, False), (None, None, True, True), (None, None, False, True)])
@pytest.mark.parametrize("form", ["sparse", "dense"])
@pytest.mark.parametrize("inplace", [False, True])
def test_split_row_kernels_match_oracle(splits, programs, reverse, lagged, form, inplace, rng):
    """Several programs per row (slices + combine), or fewer programs than rows (each looping over rows), with
    the gradient pass forwards or backwards, or the lagged kernel (5 slices a row, taken in turn by 2 programs; under
    the interpreter its statistics and gradients are two launches), give the oracle's loss and gradient, for every
    option."""
    from mlsoftmax.kernels import triton_loss

    b, k = 3, 1031
    s = rng.normal(size=(b, k)) * 3
    s[1, :700] = -np.inf  # a masked stretch: whole slices of -inf
    y = random_multihot(rng, b, k, p=0.01, empty_rows=[2])
    y[1, :700] = False
    soft = y * rng.uniform(0.5, 2.0, size=(b, k))
    w = rng.uniform(0.5, 2.0, size=k)
    rs = np.array([0.5, 1.5, 1.0])
    x = torch.tensor(s, dtype=torch.float32)
    t = torch.from_numpy(soft).float()
    if form == "sparse":
        rows, cols = np.nonzero(y)
        offs = torch.from_numpy(np.concatenate([[0], np.cumsum(y.sum(1))]))
        args = (None, torch.from_numpy(cols.copy()), offs, torch.from_numpy(soft[rows, cols]).float())
    else:
        args = (t, None, None, None)
    loss, grad = triton_loss.forward(x, *args, torch.tensor(w, dtype=torch.float32), torch.tensor(rs).float(), 0.1,
                                     True, inplace=inplace, splits=splits, programs=programs,
                                     reverse=reverse, lagged=lagged)
    np.testing.assert_allclose(loss.numpy(), R.loss(s, soft, weight=w, label_smoothing=0.1) * rs, rtol=1e-5,
                               atol=1e-5)
    expected = R.grad(s, soft, weight=w, label_smoothing=0.1) * rs[:, None]
    np.testing.assert_allclose(grad.numpy(), expected, rtol=1e-4, atol=1e-6)
    assert (grad.data_ptr() == x.data_ptr()) == inplace


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("options", [False, True])
def test_epilogue_gemm_matches_torch(dtype, options, rng):
    """The logits GEMM with the loss in its epilogue (triton_linear.gemm_stats / gemm_grad) against torch on the
    explicit logits: the stored logits, their log-sum-exp and smoothing sum (of the stored, rounded values), and
    the gradient ``a softmax - bs w``."""
    from mlsoftmax.kernels import triton_linear as TL
    from mlsoftmax.kernels.triton_loss import merge_stats, pack_coefs

    b, d, k = 5, 19, 37
    h = torch.tensor(rng.normal(size=(b, d)), dtype=torch.float32)
    w = torch.tensor(rng.normal(size=(k, d)), dtype=torch.float32)
    bias = torch.tensor(rng.normal(size=k), dtype=torch.float32) if options else None
    scale = torch.tensor(1.3) if options else None
    cw = torch.tensor(rng.uniform(0.5, 2.0, size=k), dtype=torch.float32) if options else None
    h, w, bias = (None if t is None else t.to(dtype) for t in (h, w, bias))  # the reference sees the same inputs
    ref = (h.double() @ w.double().T) * (1.3 if options else 1.0) + (0 if bias is None else bias.double())
    z, st = TL.gemm_stats(h, w, bias, scale, cw, options, write_z=True)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=2e-2)
    torch.testing.assert_close(z.double(), ref, **tol)
    lse, mass, wmass, dot, sx = merge_stats(st)
    stored = z.double()  # the statistics are of the logits as stored
    torch.testing.assert_close(lse.double(), torch.logsumexp(stored, 1), rtol=1e-5, atol=1e-5)
    assert mass.abs().max() == wmass.abs().max() == dot.abs().max() == 0  # target sums are added by the caller
    if options:
        torch.testing.assert_close(sx.double(), (stored * cw.double()).sum(1), rtol=1e-4, atol=1e-4)
    a = torch.tensor(rng.uniform(0.5, 1.5, size=b), dtype=torch.float32)
    bs = torch.tensor(rng.uniform(0.0, 0.1, size=b), dtype=torch.float32) if options else None
    lse_ref = torch.logsumexp(ref, 1).float()
    g = TL.gemm_grad(h, w, bias, scale, cw, options, pack_coefs(lse_ref, a, torch.zeros(b), bs))
    g_ref = (ref - lse_ref.double()[:, None]).exp() * a.double()[:, None]
    if options:
        g_ref = g_ref - bs.double()[:, None] * cw.double()
    torch.testing.assert_close(g.double(), g_ref, **tol)


def test_split_heuristic_fills_the_machine():
    from mlsoftmax.kernels.triton_loss import num_splits

    cpu = torch.device("cpu")  # the interpreter counts as 2 SMs: 8 programs in flight
    assert num_splits(1, 1 << 20, 128, cpu) == 8
    assert num_splits(3, 1031, 128, cpu) == 3
    assert num_splits(8, 1 << 20, 128, cpu) == 1  # the batch already fills it
    assert num_splits(1, 200, 128, cpu) == 1  # short rows stay one program


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("knob", [None, ("REVERSE_GRAD", False), ("ROW_STAGES", 3), ("LAGGED", True)],
                         ids=["default", "forward", "stages3", "lagged"])
@pytest.mark.parametrize("b", [64, 600])
def test_gpu_triton_matches_torch_path(dtype, sparse, knob, b, monkeypatch):
    """The Triton path against the torch path: split rows (64 rows cannot fill an H100) and one program per row
    (600), with the gradient pass backwards (the default) or forwards, the one-row kernel's loops pipelined
    (cp.async), or the lagged kernel. fp16 takes two passes that form the gradient in the backward (over the
    logits in place too: ``"triton-inplace"``), which no knob of the fused kernel touches."""
    from mlsoftmax.kernels import triton_loss

    if knob and dtype == torch.float16:
        pytest.skip("fp16 takes the two passes, not the fused kernel that the knob tunes")
    if knob:
        monkeypatch.setattr(triton_loss, *knob)
    g = torch.Generator().manual_seed(0)
    k = 50_000
    x = torch.randn(b, k, generator=g).to("cuda", dtype)
    idx = torch.stack([torch.randperm(k, generator=g)[:8] for _ in range(b)]).cuda()
    pos = Positives.from_padded(idx)
    tgt = pos if sparse else pos.to_dense(k)
    grads = {}
    for impl in ("torch", "triton") + (("triton-inplace",) if dtype == torch.float16 else ()):
        z = x.clone().requires_grad_()
        leaf = z.detach()  # with inplace=True the gradient is written over the logits
        loss = multilabel_softmax_loss(z, tgt, impl=impl.split("-")[0], label_smoothing=0.1,
                                       inplace=impl.endswith("inplace"))
        loss.backward()
        grads[impl] = (loss.float(), (leaf if impl.endswith("inplace") else z.grad).float())
    for impl in grads.keys() - {"torch"}:
        torch.testing.assert_close(grads[impl][0], grads["torch"][0], rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(grads[impl][1], grads["torch"][1], rtol=2e-2, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b, stages", [(64, 1), (600, 1), (600, 3)])  # ROW_STAGES: the one-row kernel's
def test_gpu_rows_at_any_alignment_match_torch_path(dtype, b, stages, monkeypatch):
    """Compiled, where the alignment the kernels promise the compiler matters: rows of an odd K that start at
    every offset from a 16-byte boundary (views into a wider buffer), split rows (64) and one program per row
    (600; its loops pipelined too, ``ROW_STAGES``), in place and not, against the torch path."""
    from mlsoftmax.kernels import triton_loss

    monkeypatch.setattr(triton_loss, "ROW_STAGES", stages)
    g = torch.Generator().manual_seed(0)
    k = 50_000 + 3
    buf = torch.randn(b, k + 16, generator=g).to("cuda", dtype)
    pos = Positives.from_padded(torch.stack([torch.randperm(k, generator=g)[:8] for _ in range(b)]).cuda())
    for off, inplace in itertools.product(range(8), (False, True)):
        view = buf[:, off:off + k]  # its rows start off columns past the buffer's
        ref = view.float().requires_grad_()
        multilabel_softmax_loss(ref, pos, impl="torch").backward()
        x = (buf.clone()[:, off:off + k] if inplace else view).requires_grad_()  # in place: a copy to overwrite
        loss = multilabel_softmax_loss(x, pos, impl="triton", inplace=inplace)
        loss.backward()
        torch.testing.assert_close(loss.float(), multilabel_softmax_loss(ref.detach(), pos, impl="torch"),
                                   rtol=1e-2 if dtype == torch.bfloat16 else 1e-4, atol=0)  # a bf16 result
        torch.testing.assert_close(x.grad.float(), ref.grad, rtol=2e-2, atol=1e-6, msg=f"offset {off}")


def _long_rows(sparse):
    """Three bf16 rows of 2^20 classes on the GPU, 8 positives each: ``(x, target, dense, row_scale)``, where
    ``target`` is the kernel's ``(dense, indices, offsets)`` for one form (the other's None) and ``dense`` the
    multi-hot target."""
    g = torch.Generator().manual_seed(0)
    b, k = 3, 1 << 20
    x = torch.randn(b, k, generator=g).to("cuda", torch.bfloat16)
    pos = Positives.from_padded(torch.rand(b, k, generator=g).topk(8, 1).indices.cuda())  # distinct in a row
    dense = pos.to_dense(k)
    target = (None, pos.indices, pos.offsets) if sparse else (dense, None, None)
    return x, target, dense, torch.ones(b, device="cuda")


def _torch_oracle(x, dense, label_smoothing):
    """PyTorch's own loss per row and its gradient, in fp32: ``F.cross_entropy(x, dense / |Y|)`` (every row has a
    positive), differentiated by autograd."""
    z = x.detach().float().clone().requires_grad_()  # a copy: x itself must not become a leaf that needs grad
    loss = F.cross_entropy(z, dense.float() / dense.float().sum(1, keepdim=True), label_smoothing=label_smoothing,
                           reduction="none")
    loss.sum().backward()
    return loss.detach(), z.grad


@pytest.mark.gpu
@pytest.mark.parametrize("sparse", [False, True])
def test_gpu_split_rows_match_one_program_per_row(sparse):
    """Few long rows (split-row kernels on the GPU) give the one-program-per-row result, and each kernel gives
    the same gradient, bit for bit, with its gradient pass reversed."""
    from mlsoftmax.kernels import triton_loss

    x, target, _, rs = _long_rows(sparse)
    assert triton_loss.num_splits(*x.shape, triton_loss._block(x.shape[1]), x.device) > 1
    one = triton_loss.forward(x, *target, None, None, rs, 0.1, True, splits=1)
    split = triton_loss.forward(x, *target, None, None, rs, 0.1, True)
    torch.testing.assert_close(split[0], one[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(split[1].float(), one[1].float(), rtol=1e-2, atol=1e-8)
    for splits, ref in ((1, one), (None, split)):
        rev = triton_loss.forward(x, *target, None, None, rs, 0.1, True, splits=splits, reverse=True)
        assert torch.equal(rev[1], ref[1]) and torch.equal(rev[0], ref[0])


@needs_triton
def test_resident_count_falls_back_to_one_program_a_sm():
    """Where the compiled kernel cannot be inspected (here: no GPU), the lagged kernel's launcher counts one
    program a SM, which a grid of one program a SM always keeps resident, instead of raising."""
    from mlsoftmax.kernels import triton_loss

    assert triton_loss.resident_per_sm(triton_loss._msl_lagged_kernel, (), {}, torch.device("cpu")) == 1


@pytest.mark.gpu
def test_gpu_lagged_kernel_fits_its_programs_a_sm(monkeypatch):
    """On the GPU the compiled lagged kernel is inspected (registers, shared memory, threads) and holds at least
    ``LAGGED_PER_SM`` programs a SM, so the launcher's safety cap leaves the default grid as it is."""
    from mlsoftmax.kernels import triton_loss

    seen = []
    real = triton_loss.resident_per_sm
    monkeypatch.setattr(triton_loss, "resident_per_sm", lambda *a: seen.append(real(*a)) or seen[-1])
    x = torch.randn(64, 131072, device="cuda").to(torch.bfloat16)
    pos = Positives.from_padded(torch.randint(0, 131072, (64, 8), device="cuda"))
    triton_loss.forward(x, None, pos.indices, pos.offsets, None, None, torch.ones(64, device="cuda"), 0.0, True,
                        lagged=True)
    assert seen and seen[0] >= triton_loss.LAGGED_PER_SM, seen


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_sm", [1, 4])  # 2, the default, in the other lagged tests
def test_gpu_lagged_kernel_long_rows_and_under_load(dtype, per_sm, monkeypatch):
    """The lagged kernel with the GPU full, repeated in place: rows of 131072 classes whose mass sits in their
    last slices for one row in 7 (a gradient written before its row's last records were in would take a wrong
    log-sum-exp), rows of 2^20 classes (64 slices a row in bf16), and rows of 2^22 (more slices than programs:
    a longer lag), against PyTorch's own loss."""
    from mlsoftmax.kernels import triton_loss

    monkeypatch.setattr(triton_loss, "LAGGED_PER_SM", per_sm)
    g = torch.Generator().manual_seed(1)
    for b, k in ((2048, 131072), (24, 1 << 20), (2, 1 << 22)):
        x = (torch.randn(b, k, generator=g) * 4).to("cuda", dtype)
        x[::7, : k // 2] -= 30.0
        pos = Positives.from_padded(torch.rand(b, k, device="cuda").topk(8, 1).indices)  # [B, 8] distinct
        rs = torch.ones(b, device="cuda")
        ref_loss, ref_grad = _torch_oracle(x, pos.to_dense(k), 0.0)
        for _ in range(3):
            z = x.clone()
            loss, grad = triton_loss.forward(z, None, pos.indices, pos.offsets, None, None, rs, 0.0, True,
                                             inplace=True, lagged=True)
            torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(grad.float(), ref_grad, rtol=1e-2, atol=1e-7)
            assert grad.data_ptr() == z.data_ptr()


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["two_pass", "lagged"])
def test_gpu_int64_offsets_large_tensor(kernel, monkeypatch):
    """B * K > 2**31: the row offsets must be int64 inside the kernel (each kernel)."""
    from mlsoftmax.kernels import triton_loss

    monkeypatch.setattr(triton_loss, "LAGGED", kernel == "lagged")
    b, k = 2**15 + 3, 2**16 + 1
    try:
        x = torch.zeros(b, k, device="cuda", dtype=torch.bfloat16)
    except torch.OutOfMemoryError:
        pytest.skip("not enough GPU memory")
    x[-1, -1] = 5.0
    pos = Positives.from_padded(torch.full((b, 1), k - 1, device="cuda"))
    expected_last = -torch.log_softmax(x[-1].float(), 0)[-1]
    expected_grad = torch.softmax(x[-1].float(), 0)[-1] - 1.0
    # the gradient pass too (the lagged kernel only runs with it), written over the logits
    out = multilabel_softmax_loss(x.requires_grad_(), pos, reduction="none", impl="triton", inplace=True)
    torch.testing.assert_close(out[-1].float(), expected_last, rtol=1e-2, atol=1e-2)
    out.sum().backward()
    torch.testing.assert_close(x.grad[-1, -1].float(), expected_grad, rtol=1e-2, atol=1e-2)


@pytest.mark.skipif("compile" not in AVAILABLE, reason="no C++ compiler for torch.compile")
def test_compiled_cpu_kernel_falls_back_to_eager_ops_with_one_warning(monkeypatch, rng):
    """A compiler that fails at run time must not break the loss: same values, one warning, then silence."""
    import warnings

    from mlsoftmax.kernels import compiled_loss

    def broken_compile(fn, **kw):
        def run(*a):
            raise RuntimeError("no compiler here")
        return run

    monkeypatch.setattr(compiled_loss, "_compiled", {})
    monkeypatch.setattr(compiled_loss.torch, "compile", broken_compile)
    s = rng.normal(size=(5, 300))
    y = random_multihot(rng, 5, 300, p=0.05)
    x = torch.tensor(s, requires_grad=True)
    with pytest.warns(UserWarning, match="compiled CPU kernel failed"):
        loss = multilabel_softmax_loss(x, torch.from_numpy(y), impl="compile")
    loss.backward()
    np.testing.assert_allclose(loss.item(), R.loss(s, y).mean(), rtol=1e-10)
    np.testing.assert_allclose(x.grad.numpy(), R.grad(s, y) / 5, rtol=1e-9, atol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the failed variant (same dtype, gradient, target form) is not retried
        multilabel_softmax_loss(x, torch.from_numpy(y), impl="compile")


@pytest.mark.skipif("compile" not in AVAILABLE, reason="no C++ compiler for torch.compile")
def test_compiled_cpu_kernel_leaves_subnormals_to_the_caller(monkeypatch, rng):
    """Inductor before torch 2.5 built its CPU kernels with -ffast-math, whose code switched the calling thread to
    flush subnormals to zero (pytorch/pytorch#126848): the loss must not change the caller's floating-point mode.
    Checked with the real kernel (torch 2.4 fails without the guard), then with a kernel that flips the mode, on
    any version; a mode that the caller chose stays."""
    from mlsoftmax.kernels import compiled_loss

    tiny = torch.tensor([2.0 ** -140])  # fp32 subnormal
    x = torch.tensor(rng.normal(size=(5, 300)), dtype=torch.float32, requires_grad=True)
    y = torch.from_numpy(random_multihot(rng, 5, 300, p=0.05))
    multilabel_softmax_loss(x, y, impl="compile").backward()
    assert (tiny * 1.0).item() == 2.0 ** -140

    def flipping_compile(fn, **kw):
        def run(*a):
            torch.set_flush_denormal(True)
            return fn(*a)
        return run

    monkeypatch.setattr(compiled_loss, "_compiled", {})
    monkeypatch.setattr(compiled_loss.torch, "compile", flipping_compile)
    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU has no flush-to-zero mode (needs SSE3)")
    try:
        loss = multilabel_softmax_loss(x, y, impl="compile")
        assert (tiny * 1.0).item() == 2.0 ** -140 and 1e-310 * np.float64(1.0) > 0
        np.testing.assert_allclose(loss.item(), R.loss(x.detach().double().numpy(), y.numpy()).mean(), rtol=1e-5)
        torch.set_flush_denormal(True)  # the caller's own choice
        multilabel_softmax_loss(x, y, impl="compile")
        assert (tiny * 1.0).item() == 0.0
    finally:
        torch.set_flush_denormal(False)


@pytest.mark.skipif("compile" not in AVAILABLE, reason="no C++ compiler for torch.compile")
def test_compiled_cpu_kernel_takes_its_threads_at_run_time(monkeypatch, rng):
    """Inductor decides serial or parallel, and fixes the thread count, from the first call's sizes, and its on-disk
    cache hands that kernel to later processes: on torch 2.8 one small call left every later process's kernel
    serial (1.8x slower at B=2048, K=32768). Compiled from a 2 x 16 call, the kernel still runs its rows in an
    OpenMP parallel region sized at run time, and matches the oracle."""
    import re

    from torch._inductor import config as inductor_config
    from torch._inductor.utils import run_and_get_code

    from mlsoftmax.kernels import compiled_loss

    monkeypatch.setattr(compiled_loss, "_compiled", {})
    torch._dynamo.reset()
    s = rng.normal(size=(2, 16)).astype(np.float32)
    y = random_multihot(rng, 2, 16, p=0.3)
    y[:, 0] = 1
    x = torch.tensor(s, requires_grad=True)
    with inductor_config.patch(fx_graph_cache=False):  # generate the code here, not load it
        loss, code = run_and_get_code(lambda: multilabel_softmax_loss(x, torch.from_numpy(y), impl="compile"))
    code = "\n".join(code)
    assert "#pragma omp parallel" in code and not re.search(r"num_threads\(\d+\)", code)
    np.testing.assert_allclose(loss.item(), R.loss(s.astype(np.float64), y).mean(), rtol=1e-5)


def test_huge_page_buffer_is_an_ordinary_tensor():
    from mlsoftmax.kernels.compiled_loss import _empty_huge

    t = _empty_huge((64, 1 << 16), torch.float32)  # 16 MB: advised
    t.fill_(2.0)
    assert t.shape == (64, 1 << 16) and t.is_contiguous() and float(t.sum()) == 2.0 * t.numel()


@needs_triton
def test_every_kernel_compiles_for_sm90_without_a_gpu():
    """The interpreter accepts code the compiler rejects (a non-constexpr global did once): lower every kernel,
    for the flag combinations the launchers use, to an sm_90 cubin with Triton's own compiler, in a subprocess
    (the interpreter must be off there)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("compile_kernels.py")
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "compiled 209 kernel variants" in proc.stdout


@needs_triton
@pytest.mark.parametrize("impl", [i for i in ("triton", "compile") if i in AVAILABLE])
def test_second_backward_through_a_fused_loss_raises(impl, rng):
    """The fused paths store the gradient in the forward and scale it in place: a second backward through the
    same graph would scale it twice, so it raises (as fp16 in place does, whose first backward overwrote the
    logits); the torch path backpropagates twice (the gradient doubles)."""
    y = random_multihot(rng, 3, 50, p=0.1)
    s = rng.normal(size=(3, 50))
    expected = R.grad(s, y) / 3  # mean over the 3 rows
    x = torch.tensor(s, dtype=torch.float32, requires_grad=True)
    out = multilabel_softmax_loss(x, torch.from_numpy(y), impl=impl)
    out.backward(retain_graph=True)
    np.testing.assert_allclose(x.grad.numpy(), expected, atol=1e-6)
    with pytest.raises(RuntimeError, match="one backward through this loss"):
        out.backward()
    if impl == "triton":  # fp16 in place: the second pass overwrote the logits that another backward would read
        z = torch.tensor(s, dtype=torch.float16, requires_grad=True)
        leaf = z.detach()
        out = multilabel_softmax_loss(z, torch.from_numpy(y), impl=impl, inplace=True)
        out.backward(retain_graph=True)
        np.testing.assert_allclose(leaf.double().numpy(), expected, atol=1e-3)
        with pytest.raises(RuntimeError, match="one backward through this loss"):
            out.backward()
    x2 = torch.tensor(s, requires_grad=True)
    out2 = multilabel_softmax_loss(x2, torch.from_numpy(y), impl="torch")
    out2.backward(retain_graph=True)
    out2.backward()
    np.testing.assert_allclose(x2.grad.numpy(), 2 * expected, atol=1e-12)
