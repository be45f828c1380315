"""multilabel_softmax_loss against the float64 oracle, PyTorch's own losses, and bad input."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import mlsoftmax.loss as loss_module
from mlsoftmax import MultiLabelSoftmaxLoss, Positives, multilabel_softmax_loss
from mlsoftmax import reference as R

from conftest import IMPLS as AVAILABLE
from conftest import random_multihot

# "auto" too: on the CPU below COMPILE_MIN_ELEMS logits it is its own path (F.cross_entropy on the dense target)
IMPLS = AVAILABLE + ["auto"]

SHAPES = [(3, 423), (252, 507), (1, 1), (7, 5)]
TOL = {torch.float64: 1e-10, torch.float32: 2e-5}


def _exact_dtype(impl):
    """The most exact dtype an implementation takes (Triton accumulates fp32 and takes no fp64)."""
    return torch.float64 if impl in ("torch", "auto") else torch.float32


def _positives_from_dense(y: np.ndarray, values=None) -> Positives:
    if values is None:
        return Positives.from_lists([np.flatnonzero(r).tolist() for r in y])
    rows, cols = np.nonzero(y)  # CSR with float64 values, to keep fp64 exactness
    offs = np.concatenate([[0], np.cumsum(y.sum(1))])
    return Positives(torch.from_numpy(cols), torch.from_numpy(offs), values=torch.from_numpy(values[rows, cols]))


def _targets(y: np.ndarray, form: str):
    """The same multi-hot target in each supported form."""
    if form == "bool":
        return torch.from_numpy(y)
    if form == "int":
        return torch.from_numpy(y.astype(np.int64))
    if form == "float":
        return torch.from_numpy(y.astype(np.float32))
    if form == "lists":
        return _positives_from_dense(y)
    if form == "padded":
        p = max(1, int(y.sum(1).max()))
        idx = np.full((y.shape[0], p), -1)
        for i, r in enumerate(y):
            nz = np.flatnonzero(r)
            idx[i, : nz.size] = nz
        return Positives.from_padded(torch.from_numpy(idx))
    if form == "csr":
        offs = np.concatenate([[0], np.cumsum(y.sum(1))])
        return Positives(torch.from_numpy(np.flatnonzero(y.reshape(-1)) % y.shape[1]), torch.from_numpy(offs))
    raise AssertionError(form)


# ----------------------------------------------------------------------------- oracle
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("form", ["bool", "int", "float", "lists", "padded", "csr"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_oracle_every_form(impl, shape, form, dtype, rng):
    if impl == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernel takes fp32/bf16/fp16 (fp64 goes to the torch path)")
    b, k = shape
    s = rng.normal(scale=3.0, size=shape)
    y = random_multihot(rng, b, k, p=0.05, empty_rows=[1] if b > 2 else [])
    x = torch.tensor(s, dtype=dtype, requires_grad=True)
    loss = multilabel_softmax_loss(x, _targets(y, form), reduction="sum", impl=impl)
    loss.backward()
    tol = TOL[dtype]
    ref = R.loss(s, y)
    assert loss.dtype == dtype
    np.testing.assert_allclose(loss.item(), ref.sum(), rtol=tol, atol=tol * b)
    np.testing.assert_allclose(x.grad.numpy(), R.grad(s, y), rtol=tol, atol=tol)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("smoothing", [0.0, 0.15])
@pytest.mark.parametrize("weighted", [False, True])
def test_options_match_oracle(impl, reduction, sparse, smoothing, weighted, rng):
    b, k = 11, 37
    s = rng.normal(size=(b, k))
    y = random_multihot(rng, b, k, p=0.2, empty_rows=[2, 5])
    soft = y * rng.uniform(0.1, 2.0, size=(b, k))
    w = rng.uniform(0.2, 3.0, size=k) if weighted else None
    sw = rng.uniform(0.0, 2.0, size=b)
    dt = _exact_dtype(impl)
    tol = TOL[dt]
    x = torch.tensor(s, dtype=dt, requires_grad=True)
    tgt = _positives_from_dense(y, values=soft) if sparse else torch.from_numpy(soft)
    out = multilabel_softmax_loss(
        x, tgt, weight=None if w is None else torch.from_numpy(w).to(dt), sample_weight=torch.from_numpy(sw).to(dt),
        reduction=reduction, label_smoothing=smoothing, impl=impl,
    )
    per_row = R.loss(s, soft, weight=w, label_smoothing=smoothing)
    expected = R.reduce(per_row, soft, reduction=reduction, sample_weight=sw)
    np.testing.assert_allclose(out.detach().numpy(), expected, rtol=tol, atol=tol)
    # gradient of the reduced loss: per-row gradients scaled by the reduction weights
    g_rows = R.grad(s, soft, weight=w, label_smoothing=smoothing) * sw[:, None]
    if reduction == "mean":
        g_rows = g_rows / (sw * (soft.sum(1) > 0)).sum()
    out.sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), g_rows, rtol=tol * 10, atol=tol * 0.1)


@pytest.mark.parametrize("impl", IMPLS)
def test_batch_dims_and_none_reduction_shape(impl, rng):
    s = rng.normal(size=(2, 3, 11))
    y = rng.random((2, 3, 11)) < 0.3
    y[..., 0] = True
    x = torch.from_numpy(s).to(_exact_dtype(impl))
    out = multilabel_softmax_loss(x, torch.from_numpy(y), reduction="none", impl=impl)
    assert out.shape == (2, 3)
    np.testing.assert_allclose(out.numpy(), R.loss(s.reshape(6, 11), y.reshape(6, 11)).reshape(2, 3), rtol=1e-6)


@pytest.mark.parametrize("impl", ["torch"])
@pytest.mark.parametrize("sparse", [False, True])
def test_gradcheck_fp64(impl, sparse, rng):
    b, k = 4, 6
    y = random_multihot(rng, b, k, p=0.4, empty_rows=[3])
    soft = y * rng.uniform(0.5, 1.5, size=(b, k))
    tgt = _positives_from_dense(y, values=soft) if sparse else torch.from_numpy(soft)
    w = torch.from_numpy(rng.uniform(0.5, 2.0, size=k))
    x = torch.tensor(rng.normal(size=(b, k)), requires_grad=True)
    f = lambda z: multilabel_softmax_loss(z, tgt, weight=w, label_smoothing=0.1, reduction="none", impl=impl)
    assert torch.autograd.gradcheck(f, (x,))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("sparse", [False, True])
def test_sample_weight_gradient_matches_oracle(impl, reduction, sparse, rng):
    """A ``sample_weight`` that requires grad (learned example weights) gets the oracle's gradient on every path,
    zero weights included, and the logits' gradient stays the oracle's."""
    b, k = 9, 31
    s = rng.normal(size=(b, k))
    y = random_multihot(rng, b, k, p=0.2, empty_rows=[2])
    sw = rng.uniform(0.0, 2.0, size=b)
    sw[[0, 5]] = 0.0  # as example reweighting starts them (Ren et al. 2018)
    dt = _exact_dtype(impl)
    tol = TOL[dt]
    x = torch.tensor(s, dtype=dt, requires_grad=True)
    tw = torch.tensor(sw, dtype=dt, requires_grad=True)
    tgt = _positives_from_dense(y) if sparse else torch.from_numpy(y)
    out = multilabel_softmax_loss(x, tgt, sample_weight=tw, reduction=reduction, impl=impl)
    u = rng.normal(size=b) if reduction == "none" else 1.0
    (out @ torch.tensor(u, dtype=dt) if reduction == "none" else out).backward()
    per_row = R.loss(s, y)
    np.testing.assert_allclose(out.detach().numpy(), R.reduce(per_row, y, reduction=reduction, sample_weight=sw),
                               rtol=tol, atol=tol)
    expected = R.sample_weight_grad(per_row, y, sw, reduction=reduction, upstream=u)
    np.testing.assert_allclose(tw.grad.numpy(), expected, rtol=tol * 10, atol=tol)
    g_rows = sw * u / ((sw * (y.sum(1) > 0)).sum() if reduction == "mean" else 1.0)
    np.testing.assert_allclose(x.grad.numpy(), R.grad(s, y) * g_rows[:, None], rtol=tol * 10, atol=tol)


@pytest.mark.parametrize("impl", ["torch", "auto"])
@pytest.mark.parametrize("sparse", [False, True])
def test_gradcheck_target_and_weights(impl, sparse, rng):
    """Soft targets (dense, or a ``Positives``' values) and class weights that require grad are differentiated
    (by PyTorch's composition), as ``F.cross_entropy`` differentiates them; the forward is held to the oracle."""
    b, k = 4, 6
    y = random_multihot(rng, b, k, p=0.4)  # no empty row: the loss jumps where a row's mass leaves 0
    soft = y * rng.uniform(0.5, 1.5, size=(b, k))
    w = torch.tensor(rng.uniform(0.5, 2.0, size=k), requires_grad=True)
    x = torch.tensor(rng.normal(size=(b, k)), requires_grad=True)
    pos = _positives_from_dense(y, values=soft)
    t = (pos.values if sparse else torch.from_numpy(soft)).clone().requires_grad_()

    def f(z, t, w):
        tgt = Positives(pos.indices, pos.offsets, values=t) if sparse else t
        # validate=False: the finite differences step the zero entries of a dense target below 0
        return multilabel_softmax_loss(z, tgt, weight=w, label_smoothing=0.1, reduction="none", impl=impl,
                                       validate=False)

    np.testing.assert_allclose(f(x, t, w).detach().numpy(),
                               R.loss(x.detach().numpy(), soft, weight=w.detach().numpy(), label_smoothing=0.1),
                               rtol=1e-10)
    assert torch.autograd.gradcheck(f, (x, t, w))


@pytest.mark.parametrize("impl", [i for i in ("triton", "compile") if i in AVAILABLE])
@pytest.mark.parametrize("what", ["target", "values", "weight"])
def test_fused_impls_refuse_to_drop_a_target_or_weight_gradient(impl, what, rng):
    y = random_multihot(rng, 3, 40, p=0.2)
    pos = _positives_from_dense(y, values=y.astype(float))
    x = torch.randn(3, 40, requires_grad=True)
    t = torch.from_numpy(y).float().requires_grad_(what == "target")
    if what == "values":
        t = Positives(pos.indices, pos.offsets, values=pos.values.float().requires_grad_())
    w = torch.ones(40, requires_grad=what == "weight")
    name = {"target": "target", "values": "target.values", "weight": "weight"}[what]
    with pytest.raises(ValueError, match=f"Expected `{name}` not to require grad with impl='{impl}'"):
        multilabel_softmax_loss(x, t, weight=w, impl=impl)
    with torch.no_grad():  # nothing to differentiate: it runs
        multilabel_softmax_loss(x, t, weight=w, impl=impl)


@pytest.mark.parametrize("impl", ["torch", "auto"])
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("options", ["plain", "all"])
def test_double_backward_matches_oracle(impl, sparse, options, rng):
    """``create_graph=True``: the Hessian-vector product of the loss is the central difference of the oracle's
    gradient along ``v``, and gradgradcheck passes ("all": class and sample weights, smoothing, soft targets)."""
    b, k = 5, 13
    s = rng.normal(size=(b, k))
    y = random_multihot(rng, b, k, p=0.3, empty_rows=[2])
    allopts = options == "all"
    soft = y * rng.uniform(0.5, 2.0, size=(b, k)) if allopts else y.astype(float)
    w = rng.uniform(0.3, 2.0, size=k) if allopts else None
    sw = rng.uniform(0.2, 2.0, size=b) if allopts else np.ones(b)
    eps = 0.1 if allopts else 0.0
    tgt = _positives_from_dense(y, values=soft) if sparse else torch.from_numpy(soft)
    kw = dict(weight=None if w is None else torch.from_numpy(w), sample_weight=torch.from_numpy(sw),
              label_smoothing=eps, reduction="sum", impl=impl)
    x = torch.tensor(s, requires_grad=True)
    v = rng.normal(size=(b, k))
    (g,) = torch.autograd.grad(multilabel_softmax_loss(x, tgt, **kw), x, create_graph=True)
    (hv,) = torch.autograd.grad(g, x, torch.from_numpy(v))
    h = 1e-5
    grad = lambda z: R.grad(z, soft, weight=w, label_smoothing=eps) * sw[:, None]
    np.testing.assert_allclose(hv.numpy(), (grad(s + h * v) - grad(s - h * v)) / (2 * h), atol=1e-8)
    assert torch.autograd.gradgradcheck(lambda z: multilabel_softmax_loss(z, tgt, **kw), (x,))


@pytest.mark.skipif("triton" not in AVAILABLE, reason="needs Triton (interpreted on the CPU)")
def test_fp16_triton_double_backward_matches_oracle(rng):
    """fp16 under ``impl="triton"`` forms its gradient in the backward (two Triton passes), which PyTorch's
    composition differentiates again: its Hessian-vector product is the oracle's central difference."""
    b, k = 4, 300
    y = random_multihot(rng, b, k, p=0.02)
    x = torch.tensor(rng.normal(size=(b, k))).half().requires_grad_()
    s = x.detach().double().numpy()
    v = rng.normal(size=(b, k))
    (g,) = torch.autograd.grad(multilabel_softmax_loss(x, _positives_from_dense(y), impl="triton", reduction="sum"),
                               x, create_graph=True)
    (hv,) = torch.autograd.grad((g.float() * torch.from_numpy(v).float()).sum(), x)
    h = 1e-5
    ref = (R.grad(s + h * v, y) - R.grad(s - h * v, y)) / (2 * h)
    np.testing.assert_allclose(hv.double().numpy(), ref, atol=2e-3 * np.abs(ref).max())


@pytest.mark.parametrize("impl", [i for i in ("triton", "compile") if i in AVAILABLE])
def test_fused_impls_refuse_double_backward(impl, rng):
    """The fused kernels' gradient is computed in the forward and is not differentiable again: a
    ``create_graph=True`` backward raises rather than return a second-order gradient without the loss's
    curvature (a Hessian-vector product through a model in front of it would be silently wrong)."""
    w = torch.randn(40, 8, requires_grad=True)
    h = torch.randn(3, 8)
    y = _positives_from_dense(random_multihot(rng, 3, 40, p=0.1))
    loss = multilabel_softmax_loss(torch.tanh(h @ w.T), y, impl=impl)
    with pytest.raises(RuntimeError, match=f"Expected a first-order backward through impl='{impl}'"):
        torch.autograd.grad(loss, w, create_graph=True)
    loss = multilabel_softmax_loss(torch.tanh(h @ w.T), y, impl=impl)
    (gw,) = torch.autograd.grad(loss, w)  # first order: as before
    assert torch.isfinite(gw).all()


@pytest.mark.parametrize("impl", ["auto", "torch"])
@pytest.mark.parametrize("k", [40, 1 << 18])  # 2^18: "auto" would take the fused CPU kernel outside torch.func
def test_per_sample_gradients_with_torch_func(impl, k, rng):
    """torch.func's vmap(grad(...)) (per-sample gradients, as in DP-SGD) and grad(...) run PyTorch's composition
    whatever the size: each row's gradient is the oracle's. Under vmap the data checks need validate=False."""
    from torch.func import grad, vmap

    b = 3
    s = rng.normal(size=(b, k))
    y = random_multihot(rng, b, k, p=20 / k, empty_rows=[])
    x, t = torch.from_numpy(s), torch.from_numpy(y).double()
    per_row = vmap(grad(lambda z, tt: multilabel_softmax_loss(z[None], tt[None], validate=False, impl=impl)))(x, t)
    np.testing.assert_allclose(per_row.numpy(), R.grad(s, y), rtol=1e-10, atol=1e-12)
    g = grad(lambda z: multilabel_softmax_loss(z, _positives_from_dense(y), reduction="sum", impl=impl))(x)
    np.testing.assert_allclose(g.numpy(), R.grad(s, y), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="Expected validate=False under torch.func.vmap"):
        vmap(grad(lambda z, tt: multilabel_softmax_loss(z[None], tt[None], impl=impl)))(x, t)


@pytest.mark.parametrize("impl", [i for i in ("triton", "compile") if i in AVAILABLE])
def test_fused_impls_refuse_torch_func(impl):
    from torch.func import grad

    with pytest.raises(ValueError, match=f"Expected impl='auto' or 'torch' under a torch.func transform .*'{impl}'"):
        grad(lambda z: multilabel_softmax_loss(z, torch.eye(3, 7), impl=impl))(torch.randn(3, 7))


# ----------------------------------------------------------------------------- PyTorch's own losses
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_single_positive_equals_cross_entropy_with_index(impl, dtype, rng):
    if impl == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernel takes fp32/bf16/fp16")
    b, k = 33, 50
    x = torch.tensor(rng.normal(size=(b, k)), dtype=dtype, requires_grad=True)
    lab = torch.from_numpy(rng.integers(0, k, size=b))
    x2 = x.detach().clone().requires_grad_()
    ours = multilabel_softmax_loss(x, Positives.from_padded(lab[:, None]), impl=impl)
    theirs = F.cross_entropy(x2, lab)
    ours.backward(), theirs.backward()
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(x.grad, x2.grad)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("smoothing", [0.0, 0.2, 1.0])  # 1.0: the uniform target, which PyTorch accepts too
def test_soft_targets_equal_cross_entropy_with_probs(impl, smoothing, rng):
    b, k = 17, 29
    dt = _exact_dtype(impl)
    x = torch.tensor(rng.normal(size=(b, k)), dtype=dt, requires_grad=True)
    probs = torch.softmax(torch.tensor(rng.normal(size=(b, k)), dtype=dt), 1)
    w = torch.tensor(rng.uniform(0.1, 2.0, size=k), dtype=dt)
    x2 = x.detach().clone().requires_grad_()
    ours = multilabel_softmax_loss(x, probs, weight=w, label_smoothing=smoothing, impl=impl)
    theirs = F.cross_entropy(x2, probs, weight=w, label_smoothing=smoothing)
    ours.backward(), theirs.backward()
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(x.grad, x2.grad)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sparse", [False, True])
def test_low_precision_no_worse_than_pytorch(impl, dtype, sparse, rng):
    b, k = 64, 300
    y = random_multihot(rng, b, k, p=0.02)
    x_lp = torch.tensor(rng.normal(scale=2.0, size=(b, k))).to(dtype)
    s64 = x_lp.double().numpy()  # the oracle sees exactly the rounded inputs
    probs = torch.from_numpy(y / y.sum(1, keepdims=True))

    x1 = x_lp.clone().requires_grad_()
    tgt = _positives_from_dense(y) if sparse else torch.from_numpy(y)
    ours = multilabel_softmax_loss(x1, tgt, reduction="sum", impl=impl)
    ours.backward()
    x2 = x_lp.clone().requires_grad_()
    theirs = F.cross_entropy(x2, probs.to(dtype), reduction="sum")
    theirs.backward()

    ref_l, ref_g = R.loss(s64, y).sum(), R.grad(s64, y)
    assert ours.dtype == dtype and x1.grad.dtype == dtype
    assert abs(ours.double().item() - ref_l) <= abs(theirs.double().item() - ref_l) + 1e-12 + abs(ref_l) * 2.0 ** -8
    err_ours = np.abs(x1.grad.double().numpy() - ref_g).max()
    err_theirs = np.abs(x2.grad.double().numpy() - ref_g).max()
    assert err_ours <= err_theirs
    # the target-class entries p - 1/|Y| are computed in fp32 and rounded once
    rel = np.abs(x1.grad.double().numpy() - ref_g) / np.maximum(np.abs(ref_g), 1e-30)
    assert rel[np.abs(ref_g) > 1e-3].max() <= 2.0 ** -8


@pytest.mark.parametrize("impl,inplace,b,k,device", [("auto", False, 512, 8192, "cpu")]
                         + [("triton", False, 512, 1024, "cpu"), ("triton", True, 512, 1024, "cpu")]
                         * ("triton" in AVAILABLE)
                         + [pytest.param("triton", inplace, 512, 8192, "cuda", marks=pytest.mark.gpu)
                            for inplace in (False, True)])
def test_fp16_under_a_loss_scale_no_worse_than_pytorch(impl, inplace, b, k, device):
    """fp16 as it is trained, with a loss scale (a ``GradScaler``'s 2^14): the gradient error against the fp64 truth
    is PyTorch's own. Formed in the forward and rounded to fp16 before the scale reaches it, most entries (~3e-8,
    fp16 subnormals) underflow: the fused CPU kernel's error was 5x PyTorch's at 512 x 8192 (so ``"auto"`` takes the
    torch path for fp16 on the CPU), the fused Triton kernel's 1.5x at 512 x 1024 (so fp16 ``"triton"`` takes two
    Triton passes that form the gradient in the backward; with ``inplace=True`` over the logits)."""
    g = torch.Generator().manual_seed(0)
    scale = 2.0**14
    x64 = (torch.randn(b, k, generator=g, dtype=torch.float64) * 2).to(device)
    pos = Positives.from_padded(torch.stack([torch.randperm(k, generator=g)[:4] for _ in range(b)]), k).to(device)
    probs = pos.to_dense(k, dtype=torch.float64)
    probs /= probs.sum(1, keepdim=True)
    z = x64.clone().requires_grad_()
    F.cross_entropy(z, probs).backward()
    errs = {}
    for name, fn in (("torch", lambda x: F.cross_entropy(x, probs.half())),
                     ("ours", lambda x: multilabel_softmax_loss(x, pos, impl=impl, inplace=inplace))):
        x = x64.half().requires_grad_()
        leaf = x.detach()  # in place, the gradient is written over the logits
        (fn(x).float() * scale).backward()
        grad = leaf if name == "ours" and inplace else x.grad
        errs[name] = ((grad.double() / scale - z.grad).norm() / z.grad.norm()).item()
    assert errs["ours"] <= 1.1 * errs["torch"], errs


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("shape", [(3, 423), (64, 14)])
def test_autocast_gives_fp32_loss_of_the_logits_as_they_are(impl, sparse, shape, rng):
    """Under ``torch.autocast`` (CPU, bf16) the loss is fp32, as ``F.cross_entropy``'s is there; the bf16 logits are
    read as they are, so the value is the fp64 oracle's on them, and their gradient stays bf16 (backward inside the
    region, where a CPU backward runs under it)."""
    b, k = shape
    y = random_multihot(rng, b, k, p=0.05)
    x_lp = torch.tensor(rng.normal(scale=2.0, size=(b, k))).to(torch.bfloat16)
    s64 = x_lp.double().numpy()
    x1 = x_lp.clone().requires_grad_()
    x2 = x_lp.clone().requires_grad_()
    tgt = _positives_from_dense(y) if sparse else torch.from_numpy(y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = multilabel_softmax_loss(x1, tgt, label_smoothing=0.1, impl=impl)
        ours.backward()
        theirs = F.cross_entropy(x2, torch.from_numpy(y / y.sum(1, keepdims=True)).float(), label_smoothing=0.1)
        theirs.backward()
    assert ours.dtype == theirs.dtype == torch.float32
    assert x1.grad.dtype == torch.bfloat16
    ref_l = R.reduce(R.loss(s64, y, label_smoothing=0.1), y)
    ref_g = R.grad(s64, y, label_smoothing=0.1) / b
    np.testing.assert_allclose(ours.item(), ref_l, rtol=2e-6)
    np.testing.assert_allclose(theirs.item(), ref_l, rtol=2e-6)
    # each entry rounded once from fp32: within half a bf16 ulp (2^-8 relative), as F.cross_entropy's under autocast
    err = np.abs(x1.grad.double().numpy() - ref_g)
    assert (err <= np.abs(ref_g) * 2.0 ** -8 + 1e-12).all()
    assert err.max() <= np.abs(x2.grad.double().numpy() - ref_g).max() + 1e-12


def test_autocast_query_works_without_the_per_device_form(monkeypatch):
    """A PyTorch whose ``is_autocast_enabled`` takes no device type (the older form): the CPU's own query is used."""
    import warnings

    from mlsoftmax import _amp

    modern = torch.is_autocast_enabled

    def older(*args):
        if args:
            raise TypeError("is_autocast_enabled() takes 0 positional arguments")
        return modern("cuda")

    cpu = torch.device("cpu")
    got = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the older CPU query is deprecated in this PyTorch
        for on in (False, True):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=on):
                monkeypatch.setattr(torch, "is_autocast_enabled", older)  # only around the query: torch uses it too
                try:
                    got.append(_amp.autocast_dtype(cpu))
                finally:
                    monkeypatch.undo()
    assert got == [None, torch.bfloat16]


# ----------------------------------------------------------------------------- numerics and edge cases
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("sparse", [False, True])
def test_empty_rows_ignore_and_error(impl, sparse, rng):
    s = rng.normal(size=(5, 8))
    y = random_multihot(rng, 5, 8, p=0.3, empty_rows=[1, 3])
    tgt = _positives_from_dense(y) if sparse else torch.from_numpy(y)
    x = torch.tensor(s, dtype=_exact_dtype(impl), requires_grad=True)
    out = multilabel_softmax_loss(x, tgt, impl=impl)
    out.backward()
    assert out.item() == pytest.approx(R.loss(s, y)[[0, 2, 4]].mean(), rel=1e-6)
    assert torch.all(x.grad[[1, 3]] == 0)
    with pytest.raises(ValueError, match=r"2 empty rows \(first: \[1, 3\]\)"):
        multilabel_softmax_loss(x, tgt, empty="error", impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_all_rows_empty_gives_zero_not_nan(impl):
    x = torch.randn(3, 4, requires_grad=True)
    out = multilabel_softmax_loss(x, torch.zeros(3, 4), impl=impl)
    out.backward()
    assert out.item() == 0.0 and torch.all(x.grad == 0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("sparse", [False, True])
def test_masked_minus_inf_classes(impl, sparse):
    s = torch.tensor([[1.0, float("-inf"), 0.5, float("-inf")], [float("-inf"), 2.0, 0.0, 1.0]], requires_grad=True)
    y = np.array([[1, 0, 1, 0], [0, 1, 0, 0]], dtype=bool)
    tgt = _positives_from_dense(y) if sparse else torch.from_numpy(y)
    out = multilabel_softmax_loss(s, tgt, reduction="sum", impl=impl)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(s.grad).all()
    assert s.grad[0, 1] == 0 and s.grad[0, 3] == 0 and s.grad[1, 0] == 0
    np.testing.assert_allclose(out.item(), R.loss(s.detach().double().numpy(), y).sum(), rtol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)  # "auto" at this size: PyTorch's own loss on the dense target
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_positive_at_minus_inf_logit_gives_inf(impl, eps):
    """A positive whose logit is -inf (a masked class), or with smoothing any -inf logit, has probability 0 under
    the target: the oracle's loss is +inf for that row, on every path (the small path clamped it to a finite
    number once); the other rows keep their finite losses, and the gradient is the oracle's finite one."""
    s = torch.tensor([[1.0, float("-inf"), 0.5, 2.0], [0.0, 1.0, -1.0, 0.5]], dtype=torch.float64)
    y = np.array([[1, 1, 0, 0], [0, 1, 0, 1]], dtype=bool)
    x = s.to(torch.float32 if impl == "triton" else s.dtype, copy=True).requires_grad_()
    out = multilabel_softmax_loss(x, torch.from_numpy(y), reduction="none", label_smoothing=eps, impl=impl)
    out.sum().backward()
    np.testing.assert_allclose(out.detach().double().numpy(), R.loss(s.numpy(), y, label_smoothing=eps), rtol=1e-6)
    assert out[0] == float("inf")
    np.testing.assert_allclose(x.grad.double().numpy(), R.grad(s.numpy(), y, label_smoothing=eps), rtol=1e-6,
                               atol=1e-7)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_huge_logits_stay_finite_and_exact(impl, dtype):
    s = torch.tensor([[1e4, 0.0, -1e4, 1e4 - 2.0], [-1e4, -1e4, -1e4 + 1.0, 5.0]], dtype=dtype, requires_grad=True)
    y = np.array([[0, 1, 0, 1], [1, 0, 1, 0]], dtype=bool)
    out = multilabel_softmax_loss(s, torch.from_numpy(y), reduction="none", impl=impl)
    out.sum().backward()
    ref = R.loss(s.detach().double().numpy(), y)
    assert torch.isfinite(out).all() and torch.isfinite(s.grad).all()
    np.testing.assert_allclose(out.double().detach().numpy(), ref, rtol=1e-2 if dtype == torch.bfloat16 else 1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_b_zero_k_one_and_noncontiguous(impl, rng):
    x0 = torch.zeros(0, 5, requires_grad=True)
    out = multilabel_softmax_loss(x0, torch.zeros(0, 5), impl=impl)
    out.backward()
    assert out.item() == 0.0 and x0.grad.shape == (0, 5)
    assert multilabel_softmax_loss(torch.zeros(0, 5), torch.zeros(0, 5), reduction="none", impl=impl).shape == (0,)

    x1 = torch.randn(4, 1, requires_grad=True)
    out = multilabel_softmax_loss(x1, torch.ones(4, 1), reduction="sum", impl=impl)
    out.backward()
    assert out.item() == pytest.approx(0.0, abs=1e-6) and torch.allclose(x1.grad, torch.zeros(4, 1))

    base = torch.tensor(rng.normal(size=(13, 9)), dtype=_exact_dtype(impl), requires_grad=True)
    xt = base.t()  # [9, 13], non-contiguous
    y = random_multihot(rng, 9, 13, p=0.3)
    out = multilabel_softmax_loss(xt, torch.from_numpy(y)[:, :], reduction="sum", impl=impl)
    out.backward()
    s64 = xt.detach().double().numpy()
    np.testing.assert_allclose(out.item(), R.loss(s64, y).sum(), rtol=1e-6)
    np.testing.assert_allclose(base.grad.t().double().numpy(), R.grad(s64, y), atol=1e-6)


def test_module_matches_functional(rng):
    x = torch.tensor(rng.normal(size=(6, 10)))
    y = torch.from_numpy(random_multihot(rng, 6, 10, p=0.3))
    w = torch.rand(10, dtype=torch.float64)
    crit = MultiLabelSoftmaxLoss(weight=w, label_smoothing=0.1, reduction="sum")
    assert torch.equal(crit(x, y), multilabel_softmax_loss(x, y, weight=w, label_smoothing=0.1, reduction="sum"))
    assert "label_smoothing=0.1" in repr(crit)


@pytest.mark.parametrize("impl,backend,dtype,inplace", [("torch", "aot_eager", torch.float32, False),
                                                        ("torch", "inductor", torch.float32, False)]
                         + [("triton", "aot_eager", torch.float32, False),  # the fused kernel
                            ("triton", "aot_eager", torch.float32, True),
                            ("triton", "aot_eager", torch.float16, False),  # its two fp16 passes
                            ("triton", "aot_eager", torch.float16, True)] * ("triton" in AVAILABLE))
@pytest.mark.parametrize("sparse", [False, True])
def test_torch_compile(impl, backend, dtype, inplace, sparse, rng):
    torch._dynamo.reset()
    b, k = 8, 16
    y = random_multihot(rng, b, k, p=0.3, empty_rows=[0])
    tgt = _positives_from_dense(y) if sparse else torch.from_numpy(y)
    s = rng.normal(size=(b, k)).astype(np.float32)
    x = torch.tensor(s, dtype=dtype, requires_grad=True)
    s = x.detach().double().numpy()  # the oracle sees the rounded inputs
    tol = 1e-6 if dtype == torch.float32 else 5e-4

    def step(z):
        return multilabel_softmax_loss(z, tgt, impl=impl, inplace=inplace, validate=False) * 2.0

    leaf = x.detach()  # in place, the gradient is written over the logits
    try:
        out = torch.compile(step, backend=backend, fullgraph=True)(x)
        out.backward()
    finally:
        torch.set_flush_denormal(False)  # torch 2.4's Inductor code flushes subnormals in this thread (#126848)
    nonempty = y.sum(1) > 0
    np.testing.assert_allclose(out.item(), 2 * R.loss(s, y)[nonempty].mean(), rtol=10 * tol)
    grad = leaf if inplace else x.grad
    if inplace and dtype == torch.float16 and not loss_module._COMPILED_BACKWARD_WRITES_INPUT:
        # before torch 2.12 the traced backward cannot write into the logits: a new buffer takes the gradient
        np.testing.assert_array_equal(leaf.double().numpy(), s)
        grad = x.grad
    np.testing.assert_allclose(grad.double().numpy(), 2 * R.grad(s, y) / nonempty.sum(), atol=tol)


@pytest.mark.gpu
@pytest.mark.parametrize("sparse", [False, True])
def test_gpu_torch_compile_with_cuda_graphs(sparse, rng):
    """CUDA: the Triton path in one graph under ``torch.compile(mode="reduce-overhead")`` (CUDA graphs: the host's
    cost per call is gone), captured and then replayed on new inputs, against the oracle."""
    torch._dynamo.reset()
    b, k = 64, 1000
    y = random_multihot(rng, b, k, p=0.01, empty_rows=[0])
    tgt = (_positives_from_dense(y) if sparse else torch.from_numpy(y)).to("cuda")
    step = torch.compile(lambda z: multilabel_softmax_loss(z, tgt, impl="triton", validate=False), mode="reduce-overhead",
                         fullgraph=True)
    nonempty = y.sum(1) > 0
    for _ in range(4):  # warm-up, capture, replays
        s = rng.normal(size=(b, k)).astype(np.float32)
        x = torch.tensor(s, device="cuda", requires_grad=True)
        out = step(x)
        out.backward()
        np.testing.assert_allclose(out.item(), R.loss(s, y)[nonempty].mean(), rtol=1e-5)
        np.testing.assert_allclose(x.grad.cpu().numpy(), R.grad(s, y) / nonempty.sum(), atol=1e-6)


# ----------------------------------------------------------------------------- property tests
@settings(max_examples=40, deadline=None)
@given(
    b=st.integers(1, 6),
    k=st.integers(1, 12),
    shift=st.floats(-50, 50),
    seed=st.integers(0, 2**16),
)
def test_properties_shift_permutation_gradient_sum(b, k, shift, seed):
    rng = np.random.default_rng(seed)
    s = rng.normal(scale=4.0, size=(b, k))
    y = rng.random((b, k)) < 0.4
    x = torch.tensor(s, requires_grad=True)
    tgt = torch.from_numpy(y)
    base = multilabel_softmax_loss(x, tgt, reduction="none")
    # shift invariance of each row
    shifted = multilabel_softmax_loss(x.detach() + shift, tgt, reduction="none")
    np.testing.assert_allclose(shifted.numpy(), base.detach().numpy(), atol=1e-9)
    # a permutation of the classes changes nothing
    perm = rng.permutation(k)
    permuted = multilabel_softmax_loss(x.detach()[:, perm], tgt[:, perm], reduction="none")
    np.testing.assert_allclose(permuted.numpy(), base.detach().numpy(), atol=1e-12)
    # the gradient sums to zero on every non-empty row (and is zero on empty rows)
    base.sum().backward()
    np.testing.assert_allclose(x.grad.sum(1).numpy(), 0.0, atol=1e-12)
    assert torch.all(x.grad[torch.from_numpy(~y.any(1))] == 0)


# ----------------------------------------------------------------------------- bad input
def _bad_cases():
    x = torch.randn(3, 5)
    y = torch.zeros(3, 5)
    y[:, 0] = 1
    return [
        ((x, torch.zeros(3, 4)), {}, ValueError, "Expected `target` to have the shape"),
        ((x, y.clone().index_fill_(1, torch.tensor([2]), -1.0)), {}, ValueError, "non-negative"),
        ((x, y.clone().index_fill_(1, torch.tensor([2]), float("nan"))), {}, ValueError, "finite"),
        ((x, Positives.from_lists([[0], [5], [1]])), {}, ValueError, r"indices in \[0, 5\)"),
        ((x, Positives(torch.tensor([0, -1, 1]), torch.tensor([0, 1, 2, 3]))), {}, ValueError, r"indices in \[0, 5\)"),
        ((x, Positives.from_lists([[0], [1]])), {}, ValueError, "3 rows"),
        ((x, Positives.from_lists([[0], [1], [2]], num_classes=7)), {}, ValueError, "num_classes == 5"),
        ((x, Positives(torch.tensor([1, 1, 2]), torch.tensor([0, 2, 3, 3]))), {}, ValueError, "unique"),
        ((x, Positives(torch.tensor([1, 2]), torch.tensor([0, 2, 1, 2]))), {}, ValueError, "non-decreasing"),
        ((x.long(), y), {}, TypeError, "Expected `logits` to have a floating dtype"),
        ((torch.tensor(1.0), y), {}, ValueError, r"Expected `logits` to have shape \[\.\.\., K\] with K >= 1"),
        ((torch.zeros(3, 0), torch.zeros(3, 0)), {}, ValueError, r"K >= 1, but got \(3, 0\)"),
        ((x, "labels"), {}, TypeError, "Expected `target` to be a dense tensor"),
        ((x, y), {"reduction": "avg"}, ValueError, "Expected `reduction` to be one of"),
        ((x, y), {"empty": "skip"}, ValueError, "Expected `empty` to be one of"),
        ((x, y), {"impl": "cuda"}, ValueError, r"Expected `impl` to be one of \('auto', 'torch', 'triton', 'compile'\)"),
        ((x, y), {"label_smoothing": 1.01}, ValueError, r"in \[0, 1\]"),
        ((x, y), {"label_smoothing": -0.1}, ValueError, r"in \[0, 1\]"),
        ((x, y), {"weight": torch.ones(4)}, ValueError, "Expected `weight` to have shape"),
        ((x, y), {"weight": -torch.ones(5)}, ValueError, "non-negative"),
        ((x, y), {"sample_weight": torch.ones(2)}, ValueError, "Expected `sample_weight` to have shape"),
        ((x, y.to("meta")), {}, ValueError, "Expected `target` to be on cpu"),
    ]


@pytest.mark.parametrize("args,kwargs,exc,match", _bad_cases())
def test_bad_input_raises_clear_error(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        multilabel_softmax_loss(*args, **kwargs)


def test_validate_false_skips_data_checks():
    x = torch.randn(2, 3)
    y = torch.tensor([[1.0, 0.0, -0.5], [0.0, 1.0, 0.0]])
    multilabel_softmax_loss(x, y, validate=False)  # no sync, no error
    with pytest.raises(ValueError):
        multilabel_softmax_loss(x, y)


@pytest.mark.parametrize("impl", [i for i in ("triton", "compile") if i in AVAILABLE])
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_grad_mode_off_computes_no_gradient(impl, mode, rng, monkeypatch):
    """Under ``torch.no_grad`` (or inference mode) logits that require grad give the oracle's loss, and the fused
    paths, which compute the gradient in their forward, do not compute one (``ctx.needs_input_grad`` alone would
    say they should)."""
    from mlsoftmax.kernels import triton_loss

    asked = []
    if impl == "triton":
        real = triton_loss.forward
        monkeypatch.setattr(triton_loss, "forward", lambda *a, **k: asked.append(a[8]) or real(*a, **k))
    else:
        real = loss_module._msl_compiled_forward_impl
        monkeypatch.setattr(loss_module, "_msl_compiled_forward_impl", lambda *a: asked.append(a[-1]) or real(*a))
    y = random_multihot(rng, 4, 300, p=0.05, empty_rows=[1])
    s = rng.normal(size=(4, 300))
    x = torch.tensor(s, dtype=torch.float32, requires_grad=True)
    with torch.no_grad() if mode == "no_grad" else torch.inference_mode():
        out = multilabel_softmax_loss(x, _positives_from_dense(y), impl=impl, reduction="sum")
    np.testing.assert_allclose(out.item(), R.loss(s, y).sum(), rtol=1e-5)
    assert asked == [False]
    out = multilabel_softmax_loss(x, _positives_from_dense(y), impl=impl, reduction="sum")  # grad mode on: computed
    assert asked == [False, True] and out.requires_grad
