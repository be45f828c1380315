"""Three forward + backward calls of the loss at the issue's point, for Nsight Compute to read one kernel launch.

The question it answers: does the gradient pass re-read each row from L2, or from DRAM? Ideal DRAM traffic
for bf16 at B=4096, K=131072 is 1 GiB read and 1 GiB written.

    ncu --clock-control none -k regex:_msl_ -s 2 -c 1 \\
        --metrics dram__bytes_read.sum,dram__bytes_write.sum,lts__t_sector_hit_rate.pct,gpu__time_duration.sum \\
        python benchmarks/ncu_loss.py --dtype bf16            # --forward: the gradient pass forwards

``regex:_msl_`` names every loss kernel. ``--row-warps 32``, ``--evict-store``, ``--stages 3`` and
``--programs 132`` set the one-row kernel's knobs (``ROW_WARPS``, ``STORE_EVICT_FIRST``, ``ROW_STAGES``,
``ROW_PROGRAMS``); ``--lagged`` runs the lagged kernel (``LAGGED``; ``--evict-store`` and ``--stages`` apply to it
too).
"""

import argparse

import torch

from mlsoftmax import Positives, multilabel_softmax_loss


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--B", type=int, default=4096)
    p.add_argument("--K", type=int, default=131072)
    p.add_argument("--forward", action="store_true", help="the gradient pass walks each row forwards")
    p.add_argument("--row-warps", type=int, default=None, help="warps of the one-row kernel (ROW_WARPS)")
    p.add_argument("--evict-store", action="store_true", help="the gradient stored evict_first (STORE_EVICT_FIRST)")
    p.add_argument("--stages", type=int, default=1, help="software-pipeline stages of its loops (ROW_STAGES)")
    p.add_argument("--programs", type=int, default=None, help="its programs, looping over rows (ROW_PROGRAMS)")
    p.add_argument("--lagged", action="store_true", help="the lagged kernel (LAGGED)")
    args = p.parse_args()
    from mlsoftmax.kernels import triton_loss

    triton_loss.REVERSE_GRAD = not args.forward
    triton_loss.ROW_WARPS = args.row_warps
    triton_loss.STORE_EVICT_FIRST = args.evict_store
    triton_loss.ROW_STAGES = args.stages
    triton_loss.ROW_PROGRAMS = args.programs
    triton_loss.LAGGED = args.lagged
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    x = torch.randn(args.B, args.K, device="cuda").to(dtype)
    pos = Positives.from_padded(torch.randint(0, args.K, (args.B, 8), device="cuda"))
    for _ in range(3):
        multilabel_softmax_loss(x.detach().requires_grad_(), pos, validate=False).backward()
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
