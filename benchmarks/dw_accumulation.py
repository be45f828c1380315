"""How much accuracy does dW lose when the rows route accumulates it across row chunks in bf16 instead of fp32?

The fused linear route over row chunks adds each chunk's ``G_r^T @ h_r`` into dW. The issue asks for fp32
accumulation and a dW error within 2x of the naive bf16 path (one GEMM over all rows, fp32 inside, rounded once).
This emulates, on the CPU, what cuBLAS does in each case (an fp32 product, then one rounding of ``C + A B`` to the
output dtype) for a softmax-minus-target gradient, and prints each error relative to the naive path's.

    python benchmarks/dw_accumulation.py                       # B=8192, D=256, K=8192, 1..16 chunks
"""

from __future__ import annotations

import argparse

import torch


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--B", type=int, default=8192)
    p.add_argument("--D", type=int, default=256)
    p.add_argument("--K", type=int, default=8192)
    p.add_argument("--npos", type=int, default=8)
    p.add_argument("--chunks", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    h = torch.randn(args.B, args.D, generator=g).bfloat16()
    w = (torch.randn(args.K, args.D, generator=g) / args.D**0.5).bfloat16()
    idx = torch.randint(0, args.K, (args.B, args.npos), generator=g)
    t = torch.zeros(args.B, args.K).scatter_(1, idx, 1.0)
    t /= t.sum(1, keepdim=True)
    grad = (torch.softmax(h.float() @ w.float().T, 1) - t) / args.B  # dLoss/dz of the mean loss, [B, K]
    gb = grad.bfloat16()  # the gradient as the bf16 route stores it
    ref = gb.double().T @ h.double()  # dW from the same bf16 operands, exactly

    def err(x):
        return ((x.double() - ref).norm() / ref.norm()).item()

    naive = err((gb.float().T @ h.float()).bfloat16())
    print(f"B={args.B} D={args.D} K={args.K}, {args.npos} positives/row: dW relative error against the exact "
          f"product of the bf16 operands; naive (one GEMM, rounded once) {naive:.3e}")
    print(f"{'chunks':>6}{'fp32 accumulator':>20}{'bf16 accumulator':>20}{'bf16 / naive':>14}")
    for n in args.chunks:
        rows = -(-args.B // n)
        acc32 = torch.zeros(args.K, args.D)
        acc16 = torch.zeros(args.K, args.D).bfloat16()
        for r0 in range(0, args.B, rows):
            part = gb[r0:r0 + rows].float().T @ h[r0:r0 + rows].float()  # one chunk's product, fp32 inside
            acc32 += part
            acc16 = (acc16.float() + part).bfloat16()  # addmm into a bf16 dW: C + A B in fp32, rounded once
        e16 = err(acc16)
        print(f"{n:>6}{err(acc32.bfloat16()):>20.3e}{e16:>20.3e}{e16 / naive:>14.2f}")


if __name__ == "__main__":
    main()
