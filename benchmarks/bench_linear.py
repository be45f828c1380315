"""Fused linear + loss: forward + backward time, peak memory and dW error against the naive path.

Every case is measured in the same run as its baselines and printed as a ratio
against ``naive`` (``F.cross_entropy(h @ w.T, probs)``) and against the three
GEMMs alone (``h @ w.T``, ``G @ w``, ``G.T @ h``).

Commands:
    python benchmarks/bench_linear.py --device cpu --B 2048 --D 128 --K 200000            # CPU time
    python benchmarks/bench_linear.py --device cpu --memory --B 2048 --D 128 --K 200000   # CPU peak RSS
    python benchmarks/bench_linear.py --device cuda --dtype bf16 --B 8192 --D 1024 --K 262144
    python benchmarks/bench_linear.py --device cuda --dtype bf16 --B 8192 --D 1024 --K 262144 --profile \
        --cases ours-fast ours-lean                                    # where the time goes, kernel by kernel
    python benchmarks/bench_linear.py --device cuda --dtype bf16 --B 8192 --D 1024 --K 262144 --amp \
        --cases gemms naive ours-fast ours-lean                        # mixed precision: fp32 weight, bf16 autocast

Cases: ``gemms`` (the three GEMMs alone), ``naive`` (explicit logits +
F.cross_entropy with a probability target), ``ours`` (impl=auto, default
budget), ``ours-fast`` (a 2 GB budget: on CUDA at the issue's point, the Triton
rows route with 2048-row chunks and an fp32 dW accumulator), ``ours-lean`` (a
256 MB budget: the lean rows route, three GEMMs with dW accumulated in bf16 and the
positives' target terms kept apart, 17 chunks of 482 rows at the issue's point;
``ours-lean-k``: the labels route there, four GEMMs, ``triton_linear.LEAN_ROWS`` off),
``ours-fast-r`` / ``ours-lean-r`` (the same with the loss kernel's gradient pass
reversed, ``triton_loss.REVERSE_GRAD``; the knobs of bench_loss.py apply, as in
``ours-fast-n3-s``, the rows route with its loss kernel's loops pipelined),
``ours-fast-e`` / ``ours-lean-e`` (the same with the logits GEMM carrying the loss in
its epilogue, ``triton_linear.EPILOGUE``),
``ours-torch`` (impl="torch": label chunks, GEMMs in the input dtype, every
elementwise step in PyTorch), ``cce`` (Apple's Cut Cross-Entropy, first positive
only, as it is called by default: its backward skips each tile of logits whose
``|softmax - target|`` entries all fall below ``filter_eps``, 2^-12 in bf16, so
its gradient is not exact), ``cce-exact`` (the same with ``filter_eps=None``: every
tile, the exact gradient) and ``liger`` (Liger's fused linear cross-entropy, first
positive only) when installed.

``--amp``: mixed-precision training as it is usually run. The weight is fp32
(a master weight), ``hidden`` is in ``--dtype`` (from an autocast backbone),
and every case's forward runs under ``torch.autocast`` in ``--dtype``; the
backward runs outside it. ``gemms`` then casts the weight too.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from _common import DTYPES, median_seconds, profile_table, reset_peak_rss, rss_kb, split_knobs, with_knobs


def make_inputs(b, d, k, npos, dtype, device, seed=0, wdtype=None):
    from mlsoftmax import Positives

    g = torch.Generator().manual_seed(seed)
    gd = torch.Generator(device=device).manual_seed(seed)  # drawn where they live
    h = torch.randn(b, d, generator=gd, device=device).to(dtype)
    w = (torch.randn(k, d, generator=gd, device=device) / d**0.5).to(wdtype or dtype)
    idx = torch.randint(0, k, (b, npos), generator=g)
    idx[:, 1:] = (idx[:, :1] + torch.arange(1, npos) * 7919) % k  # distinct within a row
    return h, w, Positives.from_padded(idx.to(device))


class _ThreeGemms(torch.autograd.Function):
    """The three GEMMs alone: ``Z = H W^T`` forward; ``Z W`` and ``Z^T H`` backward (Z standing in for G)."""

    @staticmethod
    def forward(ctx, h, w):
        z = h @ w.T  # [B, K]
        ctx.save_for_backward(z, h, w)
        return z.new_zeros(())

    @staticmethod
    def backward(ctx, _):
        z, h, w = ctx.saved_tensors
        return z @ w, z.T @ h


def case_fn(name, h, w, pos, k, amp=False):
    """A closure ``(h, w) -> loss`` for one case (its backward gives dX and dW); with ``amp``, run under autocast."""
    if not amp:
        return _case_fn(name, h, w, pos, k)
    if name == "gemms":
        return lambda hh, ww: _ThreeGemms.apply(hh, ww.to(hh.dtype))
    fn = _case_fn(name, h, w, pos, k)

    def autocast(hh, ww):
        with torch.autocast(hh.device.type, dtype=h.dtype):
            return fn(hh, ww)

    return autocast


def _case_fn(name, h, w, pos, k):
    from mlsoftmax import linear_multilabel_softmax_loss, multilabel_softmax_loss

    if name == "gemms":
        return _ThreeGemms.apply
    base, knobs = split_knobs(name)  # e.g. ours-fast-r: the fast route with the loss kernel's pass reversed
    if base.startswith("ours"):
        impl = "torch" if base == "ours-torch" else "auto"
        budget = {"ours-fast": 2 << 30, "ours-lean": 256 << 20}.get(base)
        return with_knobs(lambda hh, ww: linear_multilabel_softmax_loss(hh, ww, pos, impl=impl, memory_budget=budget,
                                                                        validate=False), knobs)
    if name == "naive-ours":
        return lambda hh, ww: multilabel_softmax_loss(hh @ ww.T, pos, validate=False)
    first = pos.indices[pos.offsets[:-1]]  # the first positive of each row
    if name == "naive":
        dense = pos.to_dense(k, dtype=h.dtype)
        probs = dense / dense.sum(1, keepdim=True)
        return lambda hh, ww: F.cross_entropy(hh @ ww.T, probs)
    if name in ("cce", "cce-exact"):
        from cut_cross_entropy import linear_cross_entropy

        if name == "cce":  # CCE's defaults: gradient filtering on
            return lambda hh, ww: linear_cross_entropy(hh, ww, first)
        return lambda hh, ww: linear_cross_entropy(hh, ww, first, filter_eps=None)
    if name == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        crit = LigerFusedLinearCrossEntropyLoss()
        return lambda hh, ww: crit(ww, hh, first)
    raise ValueError(name)


def run_once(fn, h, w):
    hh, ww = h.detach().requires_grad_(), w.detach().requires_grad_()
    fn(hh, ww).backward()
    return hh.grad, ww.grad


def time_case(fn, h, w, reps, cuda):
    return median_seconds(lambda: run_once(fn, h, w), reps, cuda)


def memory_child(args):
    """In a fresh process: peak RSS of one forward + backward beyond the inputs and their gradients."""
    dtype = DTYPES[args.dtype]
    h, w, pos = make_inputs(args.B, args.D, args.K, args.npos, dtype, "cpu")
    hs, ws, ps = make_inputs(4, args.D, 64, args.npos, dtype, "cpu", seed=1)  # warm up one-time initialisation
    run_once(case_fn(args.child, hs, ws, ps, 64), hs, ws)
    fn = case_fn(args.child, h, w, pos, args.K)  # the dense target of "naive" counts as an input
    base = reset_peak_rss()  # only live data in the base; the peak restarts from it
    t0 = time.perf_counter()
    gh, gw = run_once(fn, h, w)
    secs = time.perf_counter() - t0
    peak = rss_kb("VmHWM")
    grads_mb = (gh.numel() + gw.numel()) * gh.element_size() / 2**20
    print(json.dumps({"case": args.child, "peak_mb": (peak - base) / 1024 - grads_mb, "grads_mb": grads_mb,
                      "s": secs}))


def run_memory(args, cases):
    rows = []
    for c in cases:
        cmd = [sys.executable, __file__, "--child", c, "--B", str(args.B), "--D", str(args.D), "--K", str(args.K),
               "--npos", str(args.npos), "--dtype", args.dtype]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        rows.append(json.loads(out))
    base = next(r for r in rows if r["case"] == "naive")["peak_mb"]
    print(f"CPU peak RSS beyond inputs and their gradients ({rows[0]['grads_mb']:.0f} MB), forward + backward, "
          f"B={args.B} D={args.D} K={args.K} {args.dtype}, {args.npos} positives/row, one fresh process per case")
    print(f"{'case':<12}{'peak extra MB':>15}{'naive / case':>14}{'one-shot s':>12}")
    for r in rows:
        print(f"{r['case']:<12}{r['peak_mb']:>15.0f}{base / max(r['peak_mb'], 1e-9):>14.1f}{r['s']:>12.2f}")


def run_profile(args, cases):
    """One profiler table per case: the GEMMs against our kernels and the elementwise rest."""
    h, w, pos = make_inputs(args.B, args.D, args.K, args.npos, DTYPES[args.dtype], args.device,
                            wdtype=torch.float32 if args.amp else None)
    for c in cases:
        fn = case_fn(c, h, w, pos, args.K, amp=args.amp)
        print(f"\n== profile: {c}, B={args.B} D={args.D} K={args.K} {args.dtype}, forward + backward x3")
        print(profile_table(lambda fn=fn: run_once(fn, h, w), args.device == "cuda"))


def dw_error(fn, h, w, ref_dw):
    _, gw = run_once(fn, h, w)
    return ((gw.float() - ref_dw).norm() / ref_dw.norm()).item()


def run_time(args, cases):
    cuda = args.device == "cuda"
    dtype = DTYPES[args.dtype]
    h, w, pos = make_inputs(args.B, args.D, args.K, args.npos, dtype, args.device,
                            wdtype=torch.float32 if args.amp else None)
    name = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"{name}, torch {torch.__version__}; B={args.B} D={args.D} K={args.K} {args.dtype}"
          f"{' autocast, fp32 weight' if args.amp else ''}, {args.npos} positives/row, forward + backward, "
          f"median of {args.reps}")
    ref_dw = None
    if cuda:  # dW of the naive PyTorch path in fp32, the reference for the dW error column
        _, ref_dw = run_once(case_fn("naive", h.float(), w.float(), pos, args.K), h.float(), w.float())
        torch.cuda.empty_cache()
    print(f"{'case':<12}{'ms':>10}{'vs naive':>10}{'vs gemms':>10}{'peak MB':>10}{'dW rel err':>12}")
    res = {}
    for c in cases:
        try:
            fn = case_fn(c, h, w, pos, args.K, amp=args.amp)
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                m0 = torch.cuda.memory_allocated() + 2 * (h.numel() * h.element_size() + w.numel() * w.element_size())
            t = time_case(fn, h, w, args.reps, cuda)
            peak = (torch.cuda.max_memory_allocated() - m0) / 2**20 if cuda else float("nan")
            err = dw_error(fn, h, w, ref_dw) if (ref_dw is not None and c != "gemms") else float("nan")
        except Exception as e:  # noqa: BLE001 - report and go on
            print(f"{c:<12} skipped ({type(e).__name__}: {str(e)[:90]})")
            continue
        res[c] = t
        n, g = res.get("naive"), res.get("gemms")
        print(f"{c:<12}{t * 1e3:>10.1f}{(n / t if n else float('nan')):>10.2f}{(t / g if g else float('nan')):>10.2f}"
              f"{peak:>10.0f}{err:>12.2e}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--B", type=int, default=2048)
    p.add_argument("--D", type=int, default=128)
    p.add_argument("--K", type=int, default=200_000)
    p.add_argument("--npos", type=int, default=8)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--cases", nargs="+", default=None)
    p.add_argument("--memory", action="store_true", help="CPU peak RSS, one subprocess per case")
    p.add_argument("--profile", action="store_true", help="a torch.profiler table per case instead of timings")
    p.add_argument("--amp", action="store_true", help="an fp32 weight, each forward under autocast in --dtype")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return memory_child(args)
    gpu = ["gemms", "naive", "ours-fast", "ours-lean", "ours-torch", "cce", "cce-exact", "liger"]
    cases = args.cases or (gpu if args.device == "cuda" else ["gemms", "naive", "naive-ours", "ours"])
    if args.memory and args.amp:
        p.error("--amp times and profiles (--memory measures the plain dtypes)")
    if args.memory:
        return run_memory(args, [c for c in cases if c != "gemms"])
    if args.profile:
        return run_profile(args, cases)
    run_time(args, cases)


if __name__ == "__main__":
    main()
