"""Forward + backward time and peak memory of the loss, against PyTorch baselines.

Every row is measured in the same run as its baselines, and printed as a ratio
against them and as a fraction of the read-once/write-once limit (the logits
read once and the gradient written once, at the copy bandwidth measured here).

Commands:
    python benchmarks/bench_loss.py --device cpu --B 2048 --K 32768             # the issue's CPU point
    python benchmarks/bench_loss.py --device cpu --memory --B 2048 --K 32768    # peak RSS, one process per case
    python benchmarks/bench_loss.py --device cuda --dtype bf16 fp32 --B 4096 --K 131072
    python benchmarks/bench_loss.py --device cuda --sweep                       # K 1k..1M, B 1..16k, 1 and 8 positives
    python benchmarks/bench_loss.py --device cpu --sweep --cases torch ours     # the same, up to B*K = 2^26
    python benchmarks/bench_loss.py --device cuda --dtype bf16 --B 4096 --K 131072 --profile --cases ours
    python benchmarks/bench_loss.py --device cuda --dtype fp16 --B 4096 --K 131072 --loss-scale 16384

Cases: ``ours`` (impl=auto, sparse Positives), ``ours-small``, ``ours-torch`` and ``ours-compile`` (CPU: what
"auto" chooses between: F.cross_entropy on the dense target below ``SMALL_MAX_ELEMS`` logits, the chunked torch
path, then the fused compiled kernel from ``COMPILE_MIN_ELEMS``), ``ours-triton`` (impl="triton": on CUDA,
"auto" takes ``ours-small`` below ``CUDA_SMALL_MAX_ELEMS`` logits and this above), ``ours-dense`` (dense target),
``ours-p<N>`` (CUDA: the one-row kernel on N programs that loop over the rows,
capping the rows in flight so that their second read can stay in L2), ``ours-b<N>``
(CUDA: the kernel with N elements of a row per step, ``MAX_BLOCK``), ``ours-f`` (CUDA:
the gradient pass walks each row forwards; ``ours-r``: backwards, ``REVERSE_GRAD``, the default; knobs combine,
as in ``ours-r-p132``), ``ours-w<N>``, ``ours-s`` and ``ours-n<N>``
(CUDA: the one-row kernel with N warps, ``ROW_WARPS``; its gradient stored ``evict_first``,
``STORE_EVICT_FIRST``; its loops software-pipelined N stages deep, ``ROW_STAGES``), ``ours-l`` (CUDA: the
lagged kernel, ``LAGGED``; ``-g<N>``: N programs a SM, ``-c<N>``: slices of N bytes), ``ours-cg`` (ours under
``torch.compile(mode="reduce-overhead")``: CUDA graphs, so no host cost per call), ``torch``
(F.cross_entropy(x, probs) eager), ``compile`` (the same under torch.compile),
``liger`` (Liger-Kernel cross-entropy, one positive, if installed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch
import torch.nn.functional as F
from _common import DTYPES, median_seconds, profile_table, reset_peak_rss, rss_kb, split_knobs, with_knobs


def make_inputs(b, k, npos, dtype, device, seed=0):
    from mlsoftmax import Positives

    g = torch.Generator(device="cpu").manual_seed(seed)
    gx = torch.Generator(device=device).manual_seed(seed)  # the logits drawn where they live (fast for 2^31)
    x = torch.randn(b, k, generator=gx, device=device).to(dtype)
    first = torch.randint(0, k, (b, 1), generator=g)
    idx = (first + torch.arange(npos) * 7919) % k  # [b, npos] distinct per row (7919 is prime and odd)
    pos = Positives.from_padded(idx.to(device))
    return x, pos


def case_fn(name, x, pos, k):
    """A closure running one forward + backward for case ``name``."""
    from mlsoftmax import multilabel_softmax_loss

    if name in ("ours", "ours-torch", "ours-compile", "ours-triton"):
        impl = "auto" if name == "ours" else name[5:]
        return lambda z: multilabel_softmax_loss(z, pos, impl=impl, validate=False)
    if name == "ours-cg":  # under torch.compile with CUDA graphs: no host cost per call left (inputs are copied in)
        return torch.compile(lambda z: multilabel_softmax_loss(z, pos, validate=False), mode="reduce-overhead")
    if name == "ours-small":  # "auto"'s path for small CPU problems (F.cross_entropy on the dense target), any size
        big = {("", "SMALL_MAX_ELEMS"): 1 << 62, ("", "COMPILE_MIN_ELEMS"): 1 << 62, ("", "CUDA_SMALL_MAX_ELEMS"): 1 << 62}
        return with_knobs(lambda z: multilabel_softmax_loss(z, pos, validate=False), big)
    base, knobs = split_knobs(name)
    if knobs:  # ours-p<N>, ours-b<N>, ours-r, ours-o: kernel knobs set for the call (the kernel runs inside the forward)
        if base != "ours":
            raise ValueError(name)
        return with_knobs(lambda z: multilabel_softmax_loss(z, pos, impl="triton", validate=False), knobs)
    dense = pos.to_dense(k, dtype=x.dtype)
    probs = dense / dense.sum(1, keepdim=True).clamp_min(1)
    if name == "ours-dense":
        return lambda z: multilabel_softmax_loss(z, probs, validate=False)
    if name == "torch":
        return lambda z: F.cross_entropy(z, probs)
    if name == "compile":
        f = torch.compile(lambda z: F.cross_entropy(z, probs))
        return f
    if name == "liger":
        from liger_kernel.transformers.functional import liger_cross_entropy

        lab = pos.indices[pos.offsets[:-1]]  # the first positive of each row
        return lambda z: liger_cross_entropy(z, lab)
    raise ValueError(name)


def time_case(fn, x, reps, device, loss_scale=1.0):
    def once():
        z = x.detach().requires_grad_()
        (fn(z) if loss_scale == 1.0 else fn(z) * loss_scale).backward()

    return median_seconds(once, reps, device == "cuda")


def run_profile(args, cases):
    """One profiler table per case at the first dtype and the given shape (kernel names, counts, times)."""
    x, pos = make_inputs(args.B, args.K, args.npos, DTYPES[args.dtype[0]], args.device)
    for c in cases:
        fn = case_fn(c, x, pos, args.K)
        print(f"\n== profile: {c}, B={args.B} K={args.K} {args.dtype[0]}, {args.npos} positives/row, "
              f"forward + backward x3")
        print(profile_table(lambda fn=fn: fn(x.detach().requires_grad_()).backward(), args.device == "cuda"))


def copy_bandwidth(nbytes, device, reps=10):
    """Bytes read + written per second by a large device copy."""
    a = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    b = torch.empty_like(a)
    return 2 * a.numel() * 4 / median_seconds(lambda: b.copy_(a), reps, device == "cuda")


def memory_child(args):
    """Run in a fresh process: peak RSS of one forward + backward beyond the inputs."""
    torch.set_num_threads(args.threads or torch.get_num_threads())
    x, pos = make_inputs(args.B, args.K, args.npos, DTYPES[args.dtype[0]], "cpu")
    # Warm up on a small input first, so that one-time initialisation (thread
    # pools, dispatch tables, the compiled kernel) is not counted against the case:
    # COMPILE_MIN_ELEMS logits, so that impl="auto" picks the same path as for the real input.
    from mlsoftmax.kernels import COMPILE_MIN_ELEMS

    rows = min(args.B, max(4, -(-COMPILE_MIN_ELEMS // args.K)))
    xs, ps = make_inputs(rows, args.K, args.npos, DTYPES[args.dtype[0]], "cpu", seed=1)
    case_fn(args.child, xs, ps, args.K)(xs.detach().requires_grad_()).backward()
    del xs, ps
    fn = case_fn(args.child, x, pos, args.K)
    z = x.detach().requires_grad_()
    base = reset_peak_rss()  # only live data in the base; the peak restarts from it
    fn(z).backward()
    peak = rss_kb("VmHWM")
    grad_mb = z.grad.numel() * z.grad.element_size() / 2**20
    print(json.dumps({"case": args.child, "peak_extra_mb": (peak - base) / 1024, "grad_mb": grad_mb}))


def run_memory(args, cases):
    rows = []
    for c in cases:
        cmd = [sys.executable, __file__, "--child", c, "--B", str(args.B), "--K", str(args.K),
               "--npos", str(args.npos), "--dtype", args.dtype[0]]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        rows.append(json.loads(out))
    base = next(r for r in rows if r["case"] == "torch")["peak_extra_mb"]
    print(f"\nCPU peak RSS beyond inputs, forward + backward, B={args.B} K={args.K} {args.dtype[0]}, "
          f"{args.npos} positives/row (one fresh process per case)")
    print(f"{'case':<12}{'peak extra MB':>15}{'gradient MB':>13}{'vs torch':>10}")
    for r in rows:
        print(f"{r['case']:<12}{r['peak_extra_mb']:>15.0f}{r['grad_mb']:>13.0f}{r['peak_extra_mb'] / base:>10.2f}")


def run_time(args, cases):
    dev = args.device
    bw = copy_bandwidth(256 * 2**20, dev)
    print(f"device={dev} ({torch.cuda.get_device_name() if dev == 'cuda' else os.cpu_count()} "
          f"{'' if dev == 'cuda' else 'CPUs'}), threads={torch.get_num_threads()}, "
          f"copy bandwidth (read+write) {bw / 1e9:.1f} GB/s, torch {torch.__version__}")
    shapes = [(args.B, args.K)]
    if args.sweep:
        cap = args.max_elems or ((1 << 31) if dev == "cuda" else (1 << 26))
        shapes = [(b, k) for k in (1024, 32768, 131072, 1 << 20) for b in (1, 64, 1024, 4096, 16384)
                  if b * k <= cap]
    npos_list = [1, 8] if args.sweep else [args.npos]
    print(f"{'dtype':<6}{'B':>7}{'K':>9}{'pos':>4} {'case':<12}{'ms':>9}{'vs torch':>9}{'of limit':>9}{'peak MB':>9}")
    for dname in args.dtype:
        dtype = DTYPES[dname]
        for (b, k) in shapes:
            for npos in npos_list:
                x, pos = make_inputs(b, k, min(npos, k), dtype, dev)
                limit = 2 * x.numel() * x.element_size() / bw
                res = {}
                for c in cases:
                    if c == "liger" and npos != 1:
                        continue
                    try:
                        fn = case_fn(c, x, pos, k)
                        if dev == "cuda":
                            torch.cuda.reset_peak_memory_stats()
                            m0 = torch.cuda.memory_allocated()
                        t = time_case(fn, x, args.reps, dev, args.loss_scale)
                        peak = (torch.cuda.max_memory_allocated() - m0) / 2**20 if dev == "cuda" else float("nan")
                    except Exception as e:  # noqa: BLE001 - report and go on
                        print(f"  {c}: skipped ({type(e).__name__}: {str(e)[:80]})")
                        continue
                    res[c] = t
                    ref = res.get("torch")
                    print(f"{dname:<6}{b:>7}{k:>9}{npos:>4} {c:<12}{t * 1e3:>9.3f}"
                          f"{(ref / t if ref else float('nan')):>9.2f}{limit / t:>9.2f}{peak:>9.0f}")
                del x, pos
                if dev == "cuda":
                    torch.cuda.empty_cache()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", nargs="+", default=["fp32"], choices=list(DTYPES))
    p.add_argument("--B", type=int, default=2048)
    p.add_argument("--K", type=int, default=32768)
    p.add_argument("--npos", type=int, default=8)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--cases", nargs="+", default=None)
    p.add_argument("--loss-scale", type=float, default=1.0,
                   help="the upstream gradient of the loss, as a GradScaler's (fp16 training runs with one)")
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--max-elems", type=int, default=0,
                   help="largest B*K in the sweep (default 2^31 on CUDA, 2^26 on the CPU)")
    p.add_argument("--memory", action="store_true", help="CPU peak RSS, one subprocess per case")
    p.add_argument("--profile", action="store_true", help="a torch.profiler table per case instead of timings")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return memory_child(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    default = ["torch", "ours-torch", "ours", "ours-dense"] + (["compile", "liger"] if args.device == "cuda" else [])
    cases = args.cases or default
    if args.memory:
        return run_memory(args, cases)
    if args.profile:
        return run_profile(args, cases)
    run_time(args, cases)


if __name__ == "__main__":
    main()
