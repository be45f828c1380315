"""Host cost per call: where the fixed time of a small forward + backward goes.

At small inputs the GPU waits for the host, so the time per call is the host's.
This prints the host time per call (many calls queued, one sync at the end) for
``F.cross_entropy``, ours (on CUDA: the Triton path, and what ``impl="auto"`` picks)
and a bare launch of one of our Triton kernels, then a ``cProfile`` of ours (top
functions by own time).

Commands:
    python benchmarks/bench_overhead.py --device cuda            # B=64, K=1024 bf16
    python benchmarks/bench_overhead.py --device cuda --B 1 --K 131072
    python benchmarks/bench_overhead.py --device cpu --dtype fp32 --B 64 --K 14   # the CPU's eager torch path
    python benchmarks/bench_overhead.py --device cpu --stub --B 1 --K 131072      # Triton path's host work, no GPU
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import time

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from _common import DTYPES


def per_call_us(step, n: int, cuda: bool) -> float:
    for _ in range(10):
        step()
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e6


class _CountOps(TorchDispatchMode):
    """Counts the aten ops dispatched inside it (views and allocations included; Triton launches are not ops)."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def aten_ops(step) -> int:
    """The aten ops of one call of ``step`` (a forward and backward)."""
    with _CountOps() as count:
        step()
    return count.n


class _NoLaunch:
    """Stands in for a Triton kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--B", type=int, default=64)
    p.add_argument("--K", type=int, default=1024)
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--stub", action="store_true",
                   help="CPU: ours takes the Triton path with every loss kernel replaced by a no-op launch, so the "
                        "time is the host's own work around the kernels (no GPU needed)")
    args = p.parse_args()
    if args.stub:
        os.environ["TRITON_INTERPRET"] = "1"  # Triton's CPU mode, before it is imported; no kernel body runs
    from mlsoftmax import Positives, multilabel_softmax_loss
    from mlsoftmax.kernels import triton_loss

    if args.stub:
        for name in ("_msl_fwd_kernel", "_scale_rows_kernel", "_msl_split_stats_kernel", "_msl_split_combine_kernel",
                     "_msl_split_grad_kernel", "_msl_lagged_kernel"):
            setattr(triton_loss, name, _NoLaunch())

    cuda = args.device == "cuda"
    x = torch.randn(args.B, args.K, device=args.device).to(DTYPES[args.dtype])
    pos = Positives.from_padded(torch.randint(0, args.K, (args.B, 8), device=args.device))
    dense = pos.to_dense(args.K, dtype=x.dtype)
    probs = dense / dense.sum(1, keepdim=True)

    def torch_step():
        z = x.detach().requires_grad_()
        F.cross_entropy(z, probs).backward()

    def ours_step(impl="triton" if (args.stub or cuda) else "auto"):  # the Triton path on CUDA, whatever the size
        z = x.detach().requires_grad_()
        multilabel_softmax_loss(z, pos, validate=False, impl=impl).backward()

    g, go = torch.zeros_like(x), torch.ones((), device=args.device)

    def launch_step():  # one Triton launch that does nothing on the device (grad_out == 1 skips every row)
        triton_loss.scale_rows_(g, go)

    where = torch.cuda.get_device_name() if cuda else "CPU" + (" (Triton kernels stubbed)" if args.stub else "")
    print(f"{where}, torch {torch.__version__}; B={args.B} K={args.K} "
          f"{args.dtype}: host microseconds per call ({args.n} calls queued, one sync)")
    steps = [("F.cross_entropy fwd+bwd", torch_step), ("ours fwd+bwd" + (", Triton" if cuda else ""), ours_step)]
    if cuda:  # "auto" (PyTorch's own loss below CUDA_SMALL_MAX_ELEMS); a Triton launch needs a GPU (or the
        # interpreter, whose cost is not a launch's)
        steps += [("ours fwd+bwd, impl=auto", lambda: ours_step("auto")), ("one bare Triton launch", launch_step)]
    for name, step in steps:
        print(f"  {name:<26}{per_call_us(step, args.n, cuda):>10.1f}")
    print(f"  aten ops per call of ours (forward + backward): {aten_ops(ours_step)}")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(args.n):
        ours_step()
    if cuda:
        torch.cuda.synchronize()
    prof.disable()
    print(f"\ncProfile of ours, {args.n} calls, top 20 by own time:")
    pstats.Stats(prof).sort_stats("tottime").print_stats(20)


if __name__ == "__main__":
    main()
