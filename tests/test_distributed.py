"""Label-sharded losses on gloo with 2, 3 and 4 CPU processes and uneven shards (one of them empty), against the oracle.

The torch route runs in fp64; the Triton kernels (interpreted) run the same cases in fp32.
"""

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mlsoftmax import Positives
from mlsoftmax import reference as R
from mlsoftmax.distributed import shard_range
from mlsoftmax.kernels import available_impls

from conftest import exit_rank

B, D, K = 7, 5, 11
TRITON = "triton" in available_impls(torch.device("cpu"))  # under TRITON_INTERPRET=1 (the spawned ranks inherit it)
SPLITS = {2: [8, 3], 3: [5, 1, 5], 4: [4, 0, 6, 1]}  # uneven; a rank of three holds a single class, one of four none


def _problem():
    """The same global problem on every rank (seeded): logits, weights, targets, options."""
    rng = np.random.default_rng(0)
    y = rng.random((B, K)) < 0.25
    y[np.arange(B), rng.integers(0, K, B)] = True
    y[3] = False  # an empty row
    return dict(
        s=rng.normal(size=(B, K)) * 2, h=rng.normal(size=(B, D)), w=rng.normal(size=(K, D)), b=rng.normal(size=K),
        y=y, soft=y * rng.uniform(0.5, 2.0, size=(B, K)), cw=rng.uniform(0.5, 2.0, size=K),
        sw=rng.uniform(0.2, 2.0, size=B),
    )


CASES = {
    # name: (sparse target, class weights, sample weights, smoothing, reduction, explicit class_start)
    "plain": (True, False, False, 0.0, "mean", False),
    "options": (True, True, True, 0.1, "sum", True),
    "dense": (False, True, False, 0.05, "mean", False),
    "none": (True, False, True, 0.0, "none", False),
}


def _worker(rank, world, store, out):
    from mlsoftmax.distributed import sharded_linear_multilabel_softmax_loss, sharded_multilabel_softmax_loss

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    p = _problem()
    sizes = SPLITS[world]
    c0 = sum(sizes[:rank])
    c1 = c0 + sizes[rank]
    res = {}
    for name, (sparse, use_cw, use_sw, eps, red, explicit) in CASES.items():
        if sparse:
            rows, cols = np.nonzero(p["y"])
            offs = np.concatenate([[0], np.cumsum(p["y"].sum(1))])
            vals = torch.from_numpy(p["soft"][rows, cols])
            tgt = Positives(torch.from_numpy(cols), torch.from_numpy(offs), K, values=vals)
        else:
            tgt = torch.from_numpy(p["soft"])
        kw = dict(reduction=red, label_smoothing=eps, class_start=c0 if explicit else None,
                  weight=torch.from_numpy(p["cw"]) if use_cw else None)
        # sample weights that require grad (one tensor per loss): every rank gets their whole gradient
        sws = [torch.from_numpy(p["sw"]).clone().requires_grad_() if use_sw else None for _ in range(2)]
        up = torch.linspace(0.5, 1.5, B, dtype=torch.float64) if red == "none" else None
        # 1. the sharded loss on this rank's columns of the logits
        x = torch.from_numpy(p["s"][:, c0:c1]).clone().requires_grad_()
        loss = sharded_multilabel_softmax_loss(x, tgt, sample_weight=sws[0], **kw)
        (loss if up is None else loss @ up).backward()
        # 2. the sharded fused linear loss on this rank's classifier rows
        h = torch.from_numpy(p["h"]).clone().requires_grad_()
        w = torch.from_numpy(p["w"][c0:c1]).clone().requires_grad_()
        bias = torch.from_numpy(p["b"][c0:c1]).clone().requires_grad_()
        lin = sharded_linear_multilabel_softmax_loss(h, w, tgt, bias=bias, chunk_size=2, sample_weight=sws[1], **kw)
        (lin if up is None else lin @ up).backward()
        res[name] = dict(loss=loss.detach().numpy(), grad=x.grad.numpy(), lin=lin.detach().numpy(),
                         dh=h.grad.numpy(), dw=w.grad.numpy(), db=bias.grad.numpy(), cols=(c0, c1))
        if use_sw:
            res[name].update(dsw=sws[0].grad.numpy(), dsw_lin=sws[1].grad.numpy())
        if TRITON:
            # 3. both again in fp32 through the Triton kernels (the interpreter on the CPU)
            up32 = None if up is None else up.float()
            sws = [None if t is None else t.detach().float().requires_grad_() for t in sws]
            x32 = x.detach().float().requires_grad_()
            loss32 = sharded_multilabel_softmax_loss(x32, tgt, impl="triton", sample_weight=sws[0], **kw)
            (loss32 if up is None else loss32 @ up32).backward()
            h32, w32, b32 = (t.detach().float().requires_grad_() for t in (h, w, bias))
            lin32 = sharded_linear_multilabel_softmax_loss(h32, w32, tgt, bias=b32, chunk_size=2, impl="triton",
                                                           sample_weight=sws[1], **kw)
            (lin32 if up is None else lin32 @ up32).backward()
            res[name + "/triton"] = dict(loss=loss32.detach().numpy(), grad=x32.grad.numpy(),
                                         lin=lin32.detach().numpy(), dh=h32.grad.numpy(), dw=w32.grad.numpy(),
                                         db=b32.grad.numpy(), cols=(c0, c1))
            if use_sw:
                res[name + "/triton"].update(dsw=sws[0].grad.numpy(), dsw_lin=sws[1].grad.numpy())
    torch.save(res, os.path.join(out, f"rank{rank}.pt"))
    exit_rank()  # not dist.destroy_process_group(): see there


def _oracle(p, name):
    sparse, use_cw, use_sw, eps, red, _ = CASES[name]
    soft = p["soft"]
    cw = p["cw"] if use_cw else None
    sw = p["sw"] if use_sw else None
    up = np.linspace(0.5, 1.5, B) if red == "none" else np.ones(B)

    def loss_and_grad(z):
        val = R.reduce(R.loss(z, soft, weight=cw, label_smoothing=eps), soft, reduction=red, sample_weight=sw)
        g_row = (np.ones(B) if sw is None else sw) * up
        if red == "mean":
            g_row = g_row / ((np.ones(B) if sw is None else sw) * (soft.sum(1) > 0)).sum()
        return val, R.grad(z, soft, weight=cw, label_smoothing=eps) * g_row[:, None]

    def sw_grad(z):
        per_row = R.loss(z, soft, weight=cw, label_smoothing=eps)
        return None if sw is None else R.sample_weight_grad(per_row, soft, sw, reduction=red, upstream=up)

    loss, g = loss_and_grad(p["s"])
    z = p["h"] @ p["w"].T + p["b"]
    lin, gz = loss_and_grad(z)
    return loss, g, lin, gz @ p["w"], gz.T @ p["h"], gz.sum(0), sw_grad(p["s"]), sw_grad(z)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_sharded_losses_match_single_process_oracle(world, tmp_path):
    mp.start_processes(_worker, args=(world, str(tmp_path / "store"), str(tmp_path)), nprocs=world,
                       start_method="spawn", join=True)
    p = _problem()
    for rank in range(world):
        res = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert len(res) == len(CASES) * (2 if TRITON else 1)
        for key, r in res.items():
            name = key.split("/")[0]
            c0, c1 = r["cols"]
            loss, g, lin, dh, dw, db, dsw, dsw_lin = _oracle(p, name)
            rtol, atol = (1e-9, 1e-12) if r["loss"].dtype == np.float64 else (1e-4, 1e-6)  # fp64 torch, fp32 Triton
            np.testing.assert_allclose(r["loss"], loss, rtol=rtol, atol=atol, err_msg=key)
            np.testing.assert_allclose(r["grad"], g[:, c0:c1], rtol=rtol, atol=atol, err_msg=key)
            np.testing.assert_allclose(r["lin"], lin, rtol=rtol, atol=atol, err_msg=key)
            np.testing.assert_allclose(r["dh"], dh, rtol=rtol, atol=atol, err_msg=key)
            np.testing.assert_allclose(r["dw"], dw[c0:c1], rtol=rtol, atol=atol, err_msg=key)
            np.testing.assert_allclose(r["db"], db[c0:c1], rtol=rtol, atol=atol, err_msg=key)
            assert ("dsw" in r) == (dsw is not None), key
            if dsw is not None:
                np.testing.assert_allclose(r["dsw"], dsw, rtol=rtol, atol=atol, err_msg=key)
                np.testing.assert_allclose(r["dsw_lin"], dsw_lin, rtol=rtol, atol=atol, err_msg=key)


def test_shard_range_covers_all_classes():
    for k in (1, 7, 11, 100):
        for world in (1, 2, 3, 8):
            ranges = [shard_range(k, r, world) for r in range(world)]
            assert ranges[0][0] == 0 and ranges[-1][1] == k
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            sizes = [e - s for s, e in ranges]
            assert max(sizes) - min(sizes) <= 1


def test_bad_input_single_rank(tmp_path):
    from mlsoftmax.distributed import sharded_linear_multilabel_softmax_loss, sharded_multilabel_softmax_loss

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        x = torch.zeros(2, 4)
        with pytest.raises(ValueError, match="Expected `chunk_size` to be a positive int, but got 0"):
            sharded_linear_multilabel_softmax_loss(torch.zeros(2, 3), torch.zeros(4, 3), torch.eye(2, 4), chunk_size=0)
        with pytest.raises(ValueError, match="class_start"):
            sharded_multilabel_softmax_loss(x, Positives.from_lists([[0], [1]], 6), class_start=3)
        with pytest.raises(ValueError, match="Expected `weight` to have shape \\(6,\\)"):
            sharded_multilabel_softmax_loss(x, Positives.from_lists([[0], [1]], 6), class_start=0,
                                            weight=torch.ones(4))
        with pytest.raises(ValueError, match="Expected `local_logits` to have shape"):
            sharded_multilabel_softmax_loss(torch.zeros(4), Positives.from_lists([[0]], 4))
        with pytest.raises(TypeError, match="Expected `target`"):
            sharded_multilabel_softmax_loss(x, [[0], [1]])
        with pytest.raises(ValueError, match="Expected `impl` to be one of"):
            sharded_multilabel_softmax_loss(x, Positives.from_lists([[0], [1]], 4), impl="compile")
        with pytest.raises(ValueError, match="Expected `weight` not to require grad with the sharded loss"):
            sharded_multilabel_softmax_loss(x, Positives.from_lists([[0], [1]], 4),
                                            weight=torch.ones(4, requires_grad=True))
        with pytest.raises(ValueError, match="Expected `target` not to require grad with the sharded loss"):
            sharded_multilabel_softmax_loss(x, torch.eye(2, 4).requires_grad_())
        z = torch.zeros(2, 4, requires_grad=True)
        with pytest.raises(RuntimeError, match="Expected a first-order backward through the sharded loss"):
            torch.autograd.grad(sharded_multilabel_softmax_loss(z, torch.eye(2, 4)), z, create_graph=True)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("impl", ["torch"] + (["triton"] if TRITON else []))
def test_autocast_single_rank(impl, tmp_path):
    """Under ``torch.autocast`` (CPU, bf16), as the single-process losses: fp32 results; bf16 logits read as they are;
    the linear loss's GEMMs take bf16 operands as ``F.linear``'s would, and each gradient keeps its tensor's dtype
    (against the fp64 oracle on the bf16-rounded operands, within 2x the error of PyTorch's own composition)."""
    import torch.nn.functional as F

    from mlsoftmax.distributed import sharded_linear_multilabel_softmax_loss, sharded_multilabel_softmax_loss

    p = _problem()
    y = p["y"]
    tgt = Positives.from_lists([np.flatnonzero(r).tolist() for r in y], K)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        x = torch.tensor(p["s"]).to(torch.bfloat16).requires_grad_()
        h, w, b = (torch.tensor(p[n], dtype=torch.float32, requires_grad=True) for n in ("h", "w", "b"))
        h2, w2, b2 = (t.detach().clone().requires_grad_() for t in (h, w, b))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = sharded_multilabel_softmax_loss(x, tgt, impl=impl)
            lin = sharded_linear_multilabel_softmax_loss(h, w, tgt, bias=b, impl=impl)
            keep = y.any(1)  # the rows with a positive (an empty row adds nothing to the mean)
            naive = F.cross_entropy(F.linear(h2, w2, b2)[keep],
                                    torch.from_numpy(y[keep] / y[keep].sum(1, keepdims=True)).float())
        (loss + lin + naive).backward()
    finally:
        dist.destroy_process_group()
    assert loss.dtype == lin.dtype == torch.float32
    assert x.grad.dtype == torch.bfloat16 and h.grad.dtype == w.grad.dtype == b.grad.dtype == torch.float32
    np.testing.assert_allclose(loss.item(), R.reduce(R.loss(x.detach().double().numpy(), y), y), rtol=1e-5)
    hr, wr, br = (t.detach().to(torch.bfloat16).double().numpy() for t in (h, w, b))
    z = hr @ wr.T + br
    g = R.grad(z, y) / y.any(1).sum()  # dLoss/dz of the mean over the rows with a label
    expected = [R.reduce(R.loss(z, y), y), g @ wr, g.T @ hr, g.sum(0)]
    for ours, naive_, ref in zip([lin, h.grad, w.grad, b.grad], [naive, h2.grad, w2.grad, b2.grad], expected):
        err, err_naive = (np.linalg.norm(t.detach().double().numpy() - ref) for t in (ours, naive_))
        assert err <= 2 * err_naive + 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_sharded_triton_matches_single_process(dtype, tmp_path):
    """CUDA, one NCCL rank holding the classes [0, K): the Triton routes against the fp32 single-process torch path."""
    from mlsoftmax import linear_multilabel_softmax_loss, multilabel_softmax_loss
    from mlsoftmax.distributed import sharded_linear_multilabel_softmax_loss, sharded_multilabel_softmax_loss

    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(64, 32, generator=g), torch.randn(5000, 32, generator=g) / 4
    y = Positives.from_padded(torch.randint(0, 5000, (64, 8), generator=g)).to("cuda")
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        for sharded, single in ((sharded_multilabel_softmax_loss, multilabel_softmax_loss),
                                (sharded_linear_multilabel_softmax_loss, linear_multilabel_softmax_loss)):
            linear = sharded is sharded_linear_multilabel_softmax_loss
            ins = (h, w) if linear else (h @ w.T,)
            ref_in = [t.cuda().requires_grad_() for t in ins]
            ref = single(*ref_in, y, impl="torch")
            ref.backward()
            got_in = [t.to("cuda", dtype).requires_grad_() for t in ins]
            got = sharded(*got_in, y, label_smoothing=0.0, impl="triton")
            got.backward()
            torch.testing.assert_close(got.float(), ref, rtol=tol, atol=tol)
            for a, b in zip(got_in, ref_in):
                torch.testing.assert_close(a.grad.float(), b.grad, rtol=tol * 10, atol=tol)
    finally:
        dist.destroy_process_group()
